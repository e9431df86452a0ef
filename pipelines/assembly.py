"""From a pipeline's transformers to the runtime that samples them: engines, Sampler, graphs.

The diffusers-style pipelines (pipelines/wan.py, ltx.py) hand over named transformers, a plan and
the sampler options; `blend_runner` is the one place they touch the runtime's wiring (engine
factory, Sampler, GraphRunner), so it can follow the project's single assembly of a run.
`check_engines` and `check_cuda_graph` refuse a bad `engines` / `cuda_graph` argument with a
ValueError naming it, as diffusers' `check_inputs` does, before anything is built.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from flowblend.runtime.plan import BlendPlan
    from flowblend.runtime.sampler import LatentSampler, SamplerOptions

# The pipelines' `engines=` spellings -> the engine factory's backends (engines/factory.py).
ENGINE_OPTIONS = {"eager": "torch", "compiled": "torch-compile", "onnxruntime": "onnxruntime",
                  "tensorrt": "tensorrt"}
# `cuda_graph=` -> runtime/graph.py's modes: False none, True the whole loop in one graph, or one per step.
CUDA_GRAPH_OPTIONS = {False: "eager", True: "whole", "whole": "whole", "per_step": "per_step"}


def check_engines(engines: str) -> str:
    """The factory backend of an `engines=` spelling (today's backend names are accepted too)."""
    backend = ENGINE_OPTIONS.get(engines, engines if engines in ENGINE_OPTIONS.values() else None)
    if backend is None:
        raise ValueError(f"`engines` has to be one of {list(ENGINE_OPTIONS)} but is {engines!r}")
    return backend


def check_cuda_graph(cuda_graph, device: torch.device, with_callback: bool) -> str:
    """The graph mode of a `cuda_graph=` value; a whole-loop graph has no host step for a callback to run in."""
    mode = CUDA_GRAPH_OPTIONS.get(cuda_graph) if isinstance(cuda_graph, (bool, str)) else None
    if mode is None:
        raise ValueError(f"`cuda_graph` has to be False, True (the whole loop) or 'per_step' but is {cuda_graph!r}")
    if mode == "whole" and with_callback:
        raise ValueError("`callback_on_step_end` runs between steps, and `cuda_graph=True` captures all steps in one "
                         "graph: pass cuda_graph='per_step' (one graph per step) or cuda_graph=False")
    if mode != "eager" and device.type != "cuda":
        raise ValueError(f"`cuda_graph={cuda_graph!r}` captures CUDA graphs, but the pipeline runs on {device}: "
                         "move it with .to('cuda') or pass cuda_graph=False")
    return mode


def blend_runner(transformers: dict[str, torch.nn.Module], plan: BlendPlan, options: SamplerOptions, *,
                 engines: str, graph_mode: str, device: torch.device, dtype: torch.dtype, family_name: str,
                 latent_shape, artifacts: str = "artifacts") -> LatentSampler:
    """A LatentSampler (GraphRunner over a Sampler) of `plan` over `transformers`, engines of kind `engines`.

    `transformers` may come wrapped in their signature (engines/signature.py: LTX's rope_interpolation_scale
    depends on the VAE and frame rate); compiled backends load what `flowblend export` / `build` made for
    `family_name` at `latent_shape`. Only the models the plan runs get engines (LLL binds no small one).
    """
    from types import SimpleNamespace

    from flowblend.engines.factory import make_engines
    from flowblend.engines.iospec import dtype_name
    from flowblend.export.pairs import get_family
    from flowblend.runtime.graph import GraphRunner
    from flowblend.runtime.sampler import Sampler

    used = {name: m for name, m in transformers.items() if name in plan.models}
    pair = SimpleNamespace(family=get_family(family_name), transformers=used)  # engines/factory.LoadedModels
    built = make_engines(check_engines(engines), pair, latent_shape=latent_shape,
                         guidance=max(options.guidance_for(len(plan))), device=str(device), dtype=dtype_name(dtype),
                         artifacts=artifacts)
    sampler = Sampler({name: e for name, e in built.items() if name in used}, plan, options, device=device, dtype=dtype)
    return GraphRunner(sampler, mode=graph_mode)
