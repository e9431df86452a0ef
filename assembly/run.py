"""The one assembly of a run: pair -> engines -> Sampler -> GraphRunner -> TextToVideo.

`flowblend generate`, the server's warm pipeline (serve/warm.py) and `flowblend bench` all put a
run together here, so an engine option added to `EngineChoice` reaches all three or none: before
this module each wired its own copy, and the copies drifted (the server loaded the PyTorch
transformers for compiled backends, about 31 GB at Wan 14B + 1.3B that no engine used;
`--compile-mode` reached bench only). tests/test_assembly.py holds every caller to it.

The steps are separate functions because the callers keep different parts warm: the server loads
the pair and engines once and makes a pipeline per plan; bench makes a sampler per (backend, mode,
plan) over one pair. `assemble` does all of them for one request. Imports torch only when called.

Runs that hold their own transformers rather than a loaded pair (the diffusers-style pipelines, the
cost model's bare loop, the real-size stage's random-weight models) hand them over as a
`TransformersOnly` pair (`engines_over`); calibration, the demo and the cost model run eager
reference engines (`eager_choice`, `as_loaded`). No module outside assembly/ and engines/ makes a
TorchEngine, Sampler or GraphRunner itself (tests/test_assembly_callers.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flowblend.errors import FlowblendError

from ..engines import factory
from ..engines.kinds import REFERENCE_KIND
from ..runtime.graph_modes import GRAPH_FLAGS
from .choice import EngineChoice

NOT_ENGINE_KWARGS = ("backend", "offload")  # backend: make_engines' first argument; offload: the loader's

if TYPE_CHECKING:
    import torch

    from ..engines.base import Engine
    from ..families import LoadedPair, PairFamily
    from ..runtime.graph import GraphRunner
    from ..runtime.plan import BlendPlan
    from ..runtime.sampler import Sampler, SamplerOptions
    from ..runtime.text_to_video import TextToVideo


def load_models(family_name: str, choice: EngineChoice, large: str | None = None, small: str | None = None,
                allow_download: bool = False, with_transformers: bool | None = None) -> LoadedPair:
    """The pair for `choice`: the PyTorch transformers only where its engines run them (or `with_transformers`)."""
    from ..families import load_pair

    load = choice.runs_transformers if with_transformers is None else with_transformers
    return load_pair(family_name, large, small, dtype=factory.torch_dtype(choice.dtype), device=choice.device,
                     allow_download=allow_download, load_transformers=load, offload=choice.offload)


def engines_for(pair: LoadedPair | TransformersOnly, choice: EngineChoice, latent_shape, guidance: float,
                build: bool = False, progress: bool = False, keep_originals: bool = False,
                split_constants: bool = True) -> dict[str, Engine]:
    """The engines of `choice` at a latent shape and guidance; `build`: export (when the pair's transformers
    are loaded) and build what the engine store lacks first, under the store's lock. FP8 replaces the pair's
    weights it quantizes unless `keep_originals` (a caller comparing against them: bench, pipelines, the
    real-size stage). `split_constants`: engines/factory.make_engines (False only where the cost model times
    the whole forward)."""
    if build and not choice.runs_transformers:
        _ensure_built(pair, choice, latent_shape, guidance, progress)
    # every engine option, unchanged; `offload` places the text encoder and VAE: the loader's (load_models)
    options = {k: v for k, v in choice.to_dict().items() if k not in NOT_ENGINE_KWARGS}
    return factory.make_engines(choice.backend, pair, latent_shape=latent_shape, guidance=guidance,
                                keep_originals=keep_originals, split_constants=split_constants, **options)


@dataclass(frozen=True)
class TransformersOnly:
    """A pair as its engines read it (engines/factory.LoadedModels): a family and named transformers, no text
    encoder or VAE, for runs that hold those themselves (the pipelines) or need none (the cost model, the
    real-size stage). `family` may be None where only PyTorch engines are made (they read no engine store)."""

    family: PairFamily | None
    transformers: dict[str, Any] = field(default_factory=dict)


def engines_over(transformers: dict, choice: EngineChoice, family_name: str | None = None, latent_shape=None,
                 guidance: float = 1.0, split_constants: bool = True,
                 keep_originals: bool = False) -> dict[str, Engine]:
    """The engines of `choice` over transformers a caller holds (`engines_for` on a TransformersOnly pair);
    built kinds need `family_name` and `latent_shape` to find their engines (and then take `{}`)."""
    from ..families import get_family

    family = get_family(family_name) if family_name is not None else None
    return engines_for(TransformersOnly(family, dict(transformers)), choice, latent_shape, guidance,
                       split_constants=split_constants, keep_originals=keep_originals)


def eager_choice(device="cpu", dtype: str = "fp32") -> EngineChoice:
    """Eager PyTorch engines, never compiled: the reference kind with compile pinned to none, because the torch
    kind compiles regionally by default on CUDA (engines/kinds.py) and calibration's divergence, the demo and
    the cost model compare and time eager engines wherever they run."""
    return EngineChoice(backend=REFERENCE_KIND, device=str(device), dtype=dtype, compile="none")


def as_loaded(transformers: dict[str, torch.nn.Module], device=None) -> EngineChoice:
    """The eager choice that runs `transformers` as they are: their device (or `device`) and the dtype most of
    their weights are in, so the factory neither moves nor casts them (engines/factory._in_precision)."""
    from ..engines.iospec import dtype_name

    first = next(iter(transformers.values()))
    weights = factory.weights_dtype(first)
    if any(factory.weights_dtype(m, weights) != weights for m in transformers.values()):
        raise FlowblendError("the transformers' weights are in different dtypes: load them in one dtype")
    where = device if device is not None else next(first.parameters()).device
    return eager_choice(where, dtype_name(weights) if weights is not None else "fp32")


def warm_up_compiled(pair: LoadedPair, engines: dict[str, Engine], choice: EngineChoice, latent_shape,
                     options: SamplerOptions) -> float:
    """Run every engine once at `latent_shape` when they compile (torch.compile compiles on a first call),
    so a server pays the compile in its warm-up and not in a user's request, whatever plan the warm-up
    job runs. Returns the seconds it took (0 when nothing compiles)."""
    import time

    import torch

    from ..runtime.plan import BlendPlan, ModelSet
    from ..runtime.sampler import SamplerOptions

    if not choice.runs_transformers or choice.resolved()["compile"] == "none":
        return 0.0
    family = pair.family
    start = time.perf_counter()
    plan = BlendPlan(tuple(engines), model_set=ModelSet(tuple(family.models), tuple(family.letters)))
    # The run's CFG batch (2 when any step guides): compiled graphs are specialised to the input shapes.
    guidance = max(options.guidance_table or (options.guidance_scale,))
    warm = SamplerOptions(solver=options.solver, shift=options.shift, guidance_scale=guidance, mu=options.mu,
                          fused_kernel=options.fused_kernel)
    sampler = sampler_for(engines, plan, warm, choice)
    text = torch.zeros((1, family.text_len, family.text_dim))
    mask = {"prompt_mask": torch.ones((1, family.text_len)), "negative_prompt_mask": torch.ones((1, family.text_len))} \
        if sampler.needs_mask else {}
    sampler.sample(torch.zeros((1, *latent_shape)), text, text, **mask)
    return time.perf_counter() - start


def _ensure_built(pair: LoadedPair, choice: EngineChoice, latent_shape, guidance: float, progress: bool) -> None:
    from ..engines.build import build_pair_engines, export_record_path, locate_pair_engines

    family = pair.family
    spec = family.io_spec(latent_shape, guidance, choice.dtype)
    if pair.transformers and not export_record_path(choice.artifacts, family.name).is_file():
        from ..export.onnx import export_pair

        export_pair(pair, spec, choice.artifacts, progress=progress)
    try:
        locate_pair_engines(family.name, choice.backend, spec, choice.artifacts)
    except FlowblendError:
        # The store keys engines by GPU type and locks each build: replicas on shared storage build once.
        build_pair_engines(family.name, choice.backend, choice.artifacts, progress=progress)


def sampler_for(engines: dict[str, Engine], plan: BlendPlan, options: SamplerOptions,
                choice: EngineChoice | None = None) -> Sampler:
    """The sampler over `engines` on the choice's device and dtype (None: the engines' own, e.g. engines a
    test or a caller's Python code made)."""
    from ..runtime.sampler import Sampler

    if choice is None:
        return Sampler(engines, plan, options=options)
    return Sampler(engines, plan, options=options, device=choice.device, dtype=factory.torch_dtype(choice.dtype))


def runner_for(sampler: Sampler, mode: str = "eager") -> GraphRunner:
    """`sampler` in a runtime graph mode (runtime/graph_modes.MODES: whole | per_step | eager)."""
    from ..runtime.graph import GraphRunner

    return GraphRunner(sampler, mode=mode)


def pipeline_for(pair: LoadedPair, engines: dict[str, Engine], plan: BlendPlan, options: SamplerOptions,
                 choice: EngineChoice, graph: str = "none") -> TextToVideo:
    """Text -> latents -> video over `engines`; `graph` is a `--graph` spelling (runtime/graph_modes.py)."""
    from ..runtime.text_to_video import TextToVideo

    runner = runner_for(sampler_for(engines, plan, options, choice), GRAPH_FLAGS[graph])
    return TextToVideo(runner, pair.encode_prompt, pair.decode)


@dataclass
class AssembledRun:
    """What `assemble` made: the pair (its sources go into records), the engines and the ready pipeline."""

    pair: LoadedPair
    engines: dict[str, Engine]
    pipeline: TextToVideo


def assemble(family_name: str, latent_shape, plan: BlendPlan, options: SamplerOptions, choice: EngineChoice,
             graph: str = "none", large: str | None = None, small: str | None = None, allow_download: bool = False,
             build: bool = False) -> AssembledRun:
    """A checked request's run, ready: load the pair, make the engines, wrap them in the pipeline."""
    pair = load_models(family_name, choice, large, small, allow_download)
    guidance = max(options.guidance_for(len(plan)))
    engines = engines_for(pair, choice, latent_shape, guidance, build=build)
    return AssembledRun(pair, engines, pipeline_for(pair, engines, plan, options, choice, graph))
