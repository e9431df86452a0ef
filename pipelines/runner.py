"""From a pipeline's transformers to the runtime that samples them, through the one assembly of a run.

The diffusers-style pipelines (pipelines/wan.py, ltx.py) hand over named transformers, a plan, the
sampler options and an `EngineChoice`; `blend_runner` passes them to assembly/
(engines_for -> sampler_for) and wraps the sampler in a GraphRunner, the same steps `flowblend
generate`, the server and bench take, so an engine option added there reaches the pipelines too.
`engines=` is spelled as `flowblend generate --backend` is (a kind of engines/kinds.py, the precision
the transformers' own) or as the EngineChoice itself (FP8: EngineChoice(dtype="fp8")): no names of its own.
`engine_choice` and `check_cuda_graph` refuse a bad `engines` / `cuda_graph` argument with a
ValueError naming it, as diffusers' `check_inputs` does, before anything is built.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from flowblend.errors import FlowblendError

if TYPE_CHECKING:
    import torch

    from ..assembly import EngineChoice
    from ..runtime.plan import BlendPlan
    from ..runtime.sampler import LatentSampler, SamplerOptions

# `cuda_graph=` -> runtime/graph.py's modes: False none, True the whole loop in one graph, or one per step.
CUDA_GRAPH_OPTIONS = {False: "eager", True: "whole", "whole": "whole", "per_step": "per_step"}


def engine_choice(engines, device: torch.device, dtype: torch.dtype, artifacts: str) -> EngineChoice:
    """The EngineChoice of an `engines=` value (a --backend name, or an EngineChoice whose device becomes the
    pipeline's);
    its precision must be the transformers' dtype: the pipeline's modules are not converted behind its back."""
    from ..assembly import EngineChoice
    from ..engines.iospec import dtype_name
    from ..engines.kinds import ENGINE_KINDS, precision

    if isinstance(engines, EngineChoice):
        choice = replace(engines, device=str(device))
    elif isinstance(engines, str) and engines in ENGINE_KINDS:
        try:
            choice = EngineChoice(backend=engines, device=str(device), dtype=dtype_name(dtype), artifacts=artifacts)
        except FlowblendError as exc:
            raise ValueError(f"`engines` {engines!r}: {exc}") from None
    else:
        raise ValueError(f"`engines` has to be one of {list(ENGINE_KINDS)} (flowblend generate's --backend) or a "
                         f"flowblend.assembly.EngineChoice (FP8: EngineChoice(dtype='fp8')) but is {engines!r}")
    wanted = precision(choice.dtype).torch_dtype
    if wanted != dtype:
        raise ValueError(f"`engines` runs {choice.dtype}, whose weights are {wanted}, but the pipeline's transformers "
                         f"are {dtype}: load it with torch_dtype={wanted} (or pipe.to({wanted}))")
    return choice


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


def blend_runner(transformers: dict[str, torch.nn.Module], plan: BlendPlan, options: SamplerOptions,
                 choice: EngineChoice, *, graph_mode: str, family_name: str, latent_shape) -> LatentSampler:
    """A LatentSampler (GraphRunner over a Sampler) of `plan` over `transformers`, made by the one assembly.

    `transformers` may come wrapped in their signature (engines/signature.py: LTX's rope_interpolation_scale
    depends on the VAE and frame rate); built kinds load what `flowblend export` / `build` made for
    `family_name` at `latent_shape`. Only the models the plan runs get engines (LLL binds no small one).
    """
    from ..assembly import engines_over, runner_for, sampler_for

    used = {name: m for name, m in transformers.items() if name in plan.models}
    # The pipeline's own text encoder and VAE encode and decode: the engines get the transformers alone.
    # keep_originals: the transformers are the user's pipeline's own, left as they were (FP8 quantizes a copy)
    built = engines_over(used if choice.runs_transformers else {}, choice, family_name, latent_shape,
                         max(options.guidance_for(len(plan))), keep_originals=True)
    sampler = sampler_for({name: e for name, e in built.items() if name in used}, plan, options, choice)
    return runner_for(sampler, graph_mode)
