"""Benchmark of blended sampling against eager PyTorch LLL: speed, FLOPs, memory, runtime overhead.

Drives the runtime from above. Every (backend, mode, plan) case shares its backend's engines; eager
PyTorch LLL is always measured in the same run as the reference, and the timed repeats visit the
cases round-robin so slow drift (another process, clocks) spreads over all of them. Three passes:
1. timed: end to end (text encoding + loop + decode) with the loop timed on its own;
2. per-step: the same loop through timing wrappers around each engine call (perf_counter on CPU,
   torch.cuda.Event on GPU), kept apart so the wrappers never disturb pass 1;
3. overhead: the blended runtime against a bare loop over the same modules (module call, CFG
   combine, diffusers scheduler step), interleaved, at the pair's size and at a tiny Wan size.
`flowblend bench` is a thin CLI over `bench_pair_by_name` and `write_outputs`.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flowblend.engines.base import FlowblendError
from flowblend.engines.torch_engine import TorchEngine
from flowblend.runtime.graph import GraphRunner
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler
from flowblend.runtime.solvers import scheduler_for

from .flops import step_flops
from .memory import LiveTensorBytes, PeakMemory, current_rss_bytes, module_bytes, tensors_bytes

BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt")
MODES = ("loop", "step-graph", "loop-graph")
DEFAULT_BACKENDS = ("torch", "torch-compile")
DEFAULT_PLANS = ("LLL", "LSL:0.4,0.2", "SSS")
PROMPT = "a red circle moving left"
# tests/tiny_models.py's tiny Wan sizes: where per-step runtime overhead weighs the most.
TINY_WAN = {"large": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                          out_channels=4, text_dim=16, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=32),
            "small": dict(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=12, in_channels=4,
                          out_channels=4, text_dim=16, freq_dim=32, ffn_dim=24, num_layers=1, rope_max_seq_len=32),
            "latent": (4, 3, 4, 6), "text": (7, 16)}
TARGETS = {"realized_fraction": 0.95, "overhead_percent": 2.0}


@dataclass(frozen=True)
class BenchOptions:
    """What to measure and how often; validated once, before any model is loaded."""

    backends: tuple[str, ...] = DEFAULT_BACKENDS
    modes: tuple[str, ...] = ("loop",)
    plans: tuple[str, ...] = DEFAULT_PLANS  # plan spellings, or paths given via plan_files
    plan_files: tuple[str, ...] = ()
    steps: int | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    guidance: float | None = None
    warmup: int = 1
    repeats: int = 3
    overhead_repeats: int = 10
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    artifacts: str = "artifacts"
    compile_mode: str | None = None
    end_to_end: bool = True  # False where the pair has no real text encoder / VAE (scripts/gpu_bench.py)
    progress: bool = True

    def __post_init__(self):
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise FlowblendError(f"unknown backend(s) {unknown or '(none)'}: choose from {', '.join(BACKENDS)}")
        bad_modes = [m for m in self.modes if m not in MODES]
        if bad_modes or not self.modes:
            raise FlowblendError(f"unknown mode(s) {bad_modes or '(none)'}: choose from {', '.join(MODES)}")
        if self.repeats < 1:
            raise FlowblendError(f"--repeats must be >= 1 (timings are medians over repeats), got {self.repeats}")
        if self.steps is not None and self.steps < 1:
            raise FlowblendError(f"--steps must be >= 1, got {self.steps}")
        if self.warmup < 0 or self.overhead_repeats < 0:
            raise FlowblendError("--warmup and --overhead-repeats must be >= 0 (0 skips them)")
        for path in self.plan_files:
            if not Path(path).is_file():
                raise FlowblendError(f"plan file {path} does not exist: write one with `flowblend calibrate plan` "
                                     "or pass --plan LSL:0.4,0.2")


class Unavailable(Exception):
    """A backend or mode that cannot run here; the message says why (reported, not fatal)."""


class TimedEngine:
    """Wraps an engine and logs (model, seconds or CUDA events) per call, for the per-step pass only."""

    def __init__(self, engine, model: str, log: list, device: torch.device):
        self.engine, self.model, self.log, self.cuda = engine, model, log, device.type == "cuda"
        self.input_names, self.output_names = engine.input_names, engine.output_names

    def bind(self, tensors) -> None:
        self.engine.bind(tensors)

    def run(self, step: int) -> None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.engine.run(step)
            end.record()
            self.log.append((self.model, start, end))
        else:
            t0 = time.perf_counter()
            self.engine.run(step)
            self.log.append((self.model, time.perf_counter() - t0))


@dataclass
class Case:
    backend: str
    mode: str
    plan: BlendPlan
    sampler: Sampler
    timed_sampler: Sampler
    step_log: list
    times: dict = field(default_factory=lambda: {k: [] for k in ("encode", "loop", "decode", "e2e")})
    step_seconds: dict = field(default_factory=lambda: {"large": [], "small": []})
    engine_share: list = field(default_factory=list)
    peak: PeakMemory | None = None
    first_run_s: float | None = None  # the first warm-up run: includes compilation for torch-compile
    runner: GraphRunner | None = None  # graph modes: captures on the first run, then replays


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def resolve_plans(options: BenchOptions, steps: int) -> list[BlendPlan]:
    plans = [BlendPlan.parse(spec, steps) for spec in options.plans]
    for path in options.plan_files:
        plan = BlendPlan.from_json(Path(path).read_text())
        if len(plan) != steps:
            raise FlowblendError(f"plan file {path} has {len(plan)} steps but the run has {steps}: pass --steps {len(plan)}")
        plans.append(plan)
    return plans


# -- engines per backend ---------------------------------------------------------------------------
def _compiled_engines(backend: str, pair, options: BenchOptions, latent_shape, guidance: float) -> dict:
    """ONNX Runtime / TensorRT engines from the engine store, exported and built first if none exist."""
    from flowblend.engines.build import build_pair_engines, locate_pair_engines
    from flowblend.engines.iospec import IOSpec

    family = pair.family
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[options.dtype]
    spec = IOSpec(batch=2 if guidance > 1 else 1, latent=tuple(latent_shape), text_len=family.text_len,
                  text_dim=family.text_dim, dtype=dtype, with_mask=family.takes_text_mask, patch=tuple(family.patch))
    try:
        if backend == "tensorrt":
            from flowblend.engines.trt_engine import TrtEngine as engine_class
        else:
            from flowblend.engines.ort_engine import OrtEngine as engine_class
    except ImportError as exc:
        raise Unavailable(f"{backend} backend not importable here ({exc})") from None
    try:
        if not (Path(options.artifacts) / family.name / "onnx" / "export.json").is_file():
            from flowblend.export.onnx import export_pair

            export_pair(pair, spec, options.artifacts, progress=options.progress)
        try:
            paths = locate_pair_engines(family.name, backend, spec, options.artifacts)
        except FlowblendError:
            build_pair_engines(family.name, backend, options.artifacts, progress=options.progress)
            paths = locate_pair_engines(family.name, backend, spec, options.artifacts)
    except FlowblendError as exc:
        raise Unavailable(str(exc)) from None
    if backend == "onnxruntime":
        providers = ["CUDAExecutionProvider"] if options.device.startswith("cuda") else ["CPUExecutionProvider"]
        return {m: engine_class(p, providers=providers, name=m) for m, p in paths.items()}
    return {m: engine_class(p, name=m) for m, p in paths.items()}


def make_engines(backend: str, pair, options: BenchOptions, latent_shape, guidance: float) -> dict:
    """Engines 'large'/'small' for a backend, or Unavailable with the reason."""
    if backend == "torch":
        return {m: TorchEngine(t, name=m) for m, t in pair.transformers.items()}
    if backend == "torch-compile":
        from flowblend.engines.signature import signature_for

        kwargs = {"mode": options.compile_mode} if options.compile_mode else {}
        return {m: TorchEngine(torch.compile(signature_for(t), **kwargs), name=m) for m, t in pair.transformers.items()}
    if backend == "tensorrt" and not options.device.startswith("cuda"):
        raise Unavailable("TensorRT needs a CUDA GPU (--device cuda)")
    return _compiled_engines(backend, pair, options, latent_shape, guidance)


# bench mode -> runtime/graph.py mode: one graph per engine call (what existing TensorRT diffusion
# pipelines capture) or the whole blended loop in one graph
GRAPH_MODES = {"step-graph": "per_step", "loop-graph": "whole"}


def _check_mode(mode: str, device: torch.device) -> None:
    if mode == "loop":
        return
    if device.type != "cuda":
        raise Unavailable("CUDA graphs need a CUDA device (--device cuda)")


def graph_backend(device: torch.device):
    """The capture backend of graph modes: None = runtime/graph.py's torch.cuda.CUDAGraph backend."""
    return None


# -- measurement -----------------------------------------------------------------------------------
@torch.no_grad()
def _run_once(case: Case, pair, noise, device, end_to_end: bool, sampler: Sampler | None = None) -> dict:
    sampler = sampler or case.sampler
    t0 = time.perf_counter()
    embeds, mask = pair.encode_prompt([PROMPT, ""])
    _sync(device)
    t1 = time.perf_counter()
    masks = {} if mask is None else {"prompt_mask": mask[0:1], "negative_prompt_mask": mask[1:2]}
    runner = case.runner if sampler is case.sampler else None  # the per-step pass runs eagerly
    (runner.load if runner else sampler.load_request)(noise, embeds[0:1], embeds[1:2], **masks)
    _sync(device)
    t2 = time.perf_counter()
    if runner:
        runner.replay()
    else:
        sampler.run_loop()
    _sync(device)
    t3 = time.perf_counter()
    if end_to_end:
        pair.decode(sampler.buffers.latents)
        _sync(device)
    t4 = time.perf_counter()
    return {"encode": t1 - t0, "loop": t3 - t2, "decode": t4 - t3, "e2e": (t4 - t0) if end_to_end else (t3 - t2)}


def _per_step_pass(case: Case, pair, noise, device) -> None:
    case.step_log.clear()
    timing = _run_once(case, pair, noise, device, False, case.timed_sampler)
    total = 0.0
    for entry in case.step_log:
        seconds = entry[1].elapsed_time(entry[2]) / 1e3 if len(entry) == 3 else entry[1]
        case.step_seconds[entry[0]].append(seconds)
        total += seconds
    case.engine_share.append(total / timing["loop"])


@torch.no_grad()
def measure_overhead(modules: dict, plan: BlendPlan, sampler_kwargs: dict, guidance: float, latent_shape,
                     text_shape, repeats: int, device: torch.device, label: str, with_mask: bool = False) -> dict:
    """Blended runtime vs a bare loop over the same signature modules; medians of interleaved repeats.

    The runtime is timed twice: with engines running each module's whole forward (what it adds
    over the bare loop: its overhead) and with the default engines, which for Wan compute the
    schedule constants once per binding (engines/wan_step.py; what a user gets).
    """
    samplers = {split: Sampler({m: TorchEngine(module, name=m, split_constants=split) for m, module in modules.items()},
                               plan, guidance_scale=guidance, device=device, **sampler_kwargs)
                for split in (False, True)}
    sigs = dict(modules)
    gen = torch.Generator("cpu").manual_seed(0)
    noise = torch.randn((1, *latent_shape), generator=gen).to(device)
    cond, uncond = (torch.randn((1, *text_shape), generator=gen).to(device) for _ in range(2))
    cfg = guidance > 1
    text = torch.cat([cond, uncond]) if cfg else cond
    extra = (torch.ones(text.shape[:2], dtype=torch.int64, device=device),) if with_mask else ()
    masks = {"prompt_mask": extra[0][0:1], "negative_prompt_mask": extra[0][-1:]} if with_mask else {}
    solver, shift, mu = sampler_kwargs.get("solver", "unipc"), sampler_kwargs.get("shift", 1.0), sampler_kwargs.get("mu")
    scheduler = scheduler_for(solver, shift, use_dynamic_shifting=mu is not None)

    def bare() -> tuple[float, torch.Tensor]:
        scheduler.set_timesteps(len(plan), **({"mu": mu} if mu is not None else {}))
        latents = noise.clone()
        _sync(device)
        t0 = time.perf_counter()
        for i, t in enumerate(scheduler.timesteps):
            x = torch.cat([latents, latents]) if cfg else latents
            v = sigs[plan.models[i]](x, t.expand(x.shape[0]).to(device), text, *extra)
            if cfg:
                v_cond, v_uncond = v.chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
        _sync(device)
        return time.perf_counter() - t0, latents

    def blended(sampler: Sampler) -> tuple[float, torch.Tensor]:
        sampler.load_request(noise, cond, uncond if cfg else None, **masks)
        _sync(device)
        t0 = time.perf_counter()
        sampler.run_loop()
        _sync(device)
        return time.perf_counter() - t0, sampler.buffers.latents

    split_engines = any(e.step_split is not None for e in samplers[True].engines.values())
    runs = {"bare": bare, "runtime": lambda: blended(samplers[False])}
    if split_engines:
        runs["split"] = lambda: blended(samplers[True])
    _, ref = bare()
    diffs = {name: float((ref - runs[name]()[1]).abs().max()) for name in runs if name != "bare"}
    times = {name: [] for name in runs}
    order = list(runs)
    for r in range(repeats):
        for name in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
            times[name].append(runs[name]()[0])
    b, s = statistics.median(times["bare"]), statistics.median(times["runtime"])
    split = statistics.median(times["split"]) if split_engines else None

    def versus_bare(name: str) -> float:  # per round, as the bench's speedups: drift common to a round cancels
        return 100 * (statistics.median(paired_ratios(times[name], times["bare"])) - 1)
    return {"size": label, "plan": plan.label, "latent_shape": list(latent_shape), "repeats": repeats,
            "bare_loop_ms": 1e3 * b, "runtime_loop_ms": 1e3 * s, "overhead_percent": versus_bare("runtime"),
            "max_abs_diff_vs_bare": diffs["runtime"],
            "split_constants": split_engines,
            "runtime_split_loop_ms": 1e3 * split if split_engines else None,
            "split_vs_bare_percent": versus_bare("split") if split_engines else None,
            "split_max_abs_diff_vs_bare": diffs.get("split"),
            "rounds_ms": {name: [1e3 * t for t in v] for name, v in times.items()}}


def _tiny_wan_overhead(options: BenchOptions, sampler_kwargs: dict, guidance: float, steps: int, device) -> dict:
    from diffusers import WanTransformer3DModel
    from flowblend.engines.signature import signature_for

    torch.manual_seed(0)
    modules = {m: signature_for(WanTransformer3DModel(**TINY_WAN[m]).eval()).to(device) for m in ("large", "small")}
    plan = BlendPlan.parse("LSL:0.4,0.2", steps)
    kwargs = {k: v for k, v in sampler_kwargs.items() if k != "mu"}
    return measure_overhead(modules, plan, kwargs, guidance, TINY_WAN["latent"], TINY_WAN["text"],
                            5 * options.overhead_repeats, device, "tiny Wan")


@torch.no_grad()
def _memory_budget(pair, engines: dict, plan: BlendPlan, sampler_kwargs: dict, guidance: float, noise, options,
                   baseline_rss: int | None) -> dict:
    """The blended run's peak against weights of both models + the large model's activations + buffers.

    Taken before any other backend exists (a compiler's own memory is not the runtime's), over the
    benchmark's blended plan. Activations are CUDA allocator peaks on GPU and live tensor storages
    on CPU (LiveTensorBytes); RSS is reported too. Constants an engine precomputes per binding
    (engines/wan_step.py) are counted with its weights, as a compiler's folded constants would be.
    """
    device = torch.device(options.device)
    rss_loaded = current_rss_bytes()  # models loaded, no buffers yet
    sampler = Sampler(engines, plan, guidance_scale=guidance, device=device, dtype=options.dtype, **sampler_kwargs)
    embeds, mask = pair.encode_prompt([PROMPT, ""])
    masks = {} if mask is None else {"prompt_mask": mask[0:1], "negative_prompt_mask": mask[1:2]}
    bufs = sampler.load_request(noise, embeds[0:1], embeds[1:2], **masks)
    buffers = tensors_bytes([bufs.latents, bufs.model_input, bufs.text_embeds, bufs.text_mask, bufs.timestep_table,
                             bufs.velocity, bufs.guided, *bufs.state.values()])
    weights = {m: module_bytes(t) for m, t in pair.transformers.items()}
    constants = {m: getattr(engines[m], "constants_bytes", lambda: 0)() for m in pair.transformers}
    tracked = {}
    for region, run in (("forward", lambda: engines["large"].run(0)), ("blended", sampler.run_loop)):
        live = LiveTensorBytes() if device.type == "cpu" else contextlib.nullcontext()
        with PeakMemory(device) as peak, live:
            run()
        tracked[region] = (peak, live)
    (forward, forward_live), (blended, blended_live) = tracked["forward"], tracked["blended"]
    static = sum(weights.values()) + sum(constants.values()) + buffers
    if device.type == "cuda":
        activations, measured = forward.added, blended.allocated_peak
        what = "max_memory_allocated during the blended loop"
    else:
        activations, measured = forward_live.peak, static + blended_live.peak
        what = "weights + engine constants + buffers + peak live tensors created during the blended loop"
    return {"plan": plan.label, "weights_bytes": weights, "engine_constants_bytes": constants,
            "large_activations_bytes": activations,
            "shared_buffers_bytes": buffers, "bound_bytes": static + activations, "measured_bytes": measured,
            "measured": what, "met": measured <= static + activations,
            "rss": {"before_load_bytes": baseline_rss, "loaded_bytes": rss_loaded,
                    "first_large_forward_growth_bytes": forward.rss_peak - forward.rss_start,
                    "blended_peak_bytes": blended.rss_peak,
                    "process_growth_bytes": (blended.rss_peak - baseline_rss) if baseline_rss else None},
            "blended": blended.to_dict()}


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "load_average": os.getloadavg()}
    for lib in ("diffusers", "onnxruntime", "tensorrt"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            pass
    if device.type == "cuda":
        from flowblend.runtime.fused import load_library

        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    fused_step_kernel=load_library() is not None)  # the Sampler uses it on CUDA when built
    return info


def bench_pair_by_name(name: str, options: BenchOptions, large: str | None = None, small: str | None = None,
                       allow_download: bool = False) -> dict:
    """Load a registered pair and benchmark it; the RSS before loading is the memory baseline."""
    import diffusers

    from flowblend.export.pairs import get_family, load_pair

    getattr(diffusers, get_family(name).transformer_class)  # import the model code before the baseline
    baseline = current_rss_bytes()
    pair = load_pair(name, large, small, dtype=options.dtype, device=options.device, allow_download=allow_download)
    return run_bench(pair, options, baseline_rss=baseline)


def _build_cases(pair, eager: dict, plans, options: BenchOptions, latent_shape, guidance: float,
                 sampler_kwargs: dict) -> tuple[list[Case], list[dict]]:
    """One Case per (backend, mode, plan) that can run here; the rest listed with the reason."""
    device = torch.device(options.device)
    cases, skipped = [], []
    for backend in dict.fromkeys(("torch",) + tuple(options.backends)):
        try:
            engines = eager if backend == "torch" else make_engines(backend, pair, options, latent_shape, guidance)
        except Unavailable as exc:
            skipped.append({"backend": backend, "mode": "*", "reason": str(exc)})
            continue
        log: list = []
        timed = {m: TimedEngine(e, m, log, device) for m, e in engines.items()}
        for mode in dict.fromkeys(("loop",) + tuple(options.modes)):
            try:
                _check_mode(mode, device)
            except Unavailable as exc:
                skipped.append({"backend": backend, "mode": mode, "reason": str(exc)})
                continue
            for plan in plans:
                make = lambda e: Sampler(e, plan, guidance_scale=guidance, device=device, dtype=options.dtype,  # noqa: E731
                                         **sampler_kwargs)
                case = Case(backend, mode, plan, make(engines), make(timed), log)
                if mode in GRAPH_MODES:
                    case.runner = GraphRunner(case.sampler, GRAPH_MODES[mode], backend=graph_backend(device))
                cases.append(case)
    return cases, skipped


def _warm_up(cases: list[Case], pair, noise, options: BenchOptions, skipped: list, bar) -> list[Case]:
    """Untimed runs; torch.compile compiles here and may fail here: its cases are then dropped and reported."""
    device, runs, failed = torch.device(options.device), max(options.warmup, 1), set()
    for case in cases:
        bar.set_postfix_str(f"warm-up {case.backend} {case.mode} {case.plan.label}")
        for _ in range(runs):
            if (case.backend, case.mode) in failed:
                break
            try:
                t0 = time.perf_counter()
                _run_once(case, pair, noise, device, options.end_to_end)
                case.first_run_s = case.first_run_s or time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - a compiler or a capture failing is a result to report
                if (case.backend, case.mode) == ("torch", "loop"):
                    raise
                failed.add((case.backend, case.mode))
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                skipped.append({"backend": case.backend, "mode": case.mode,
                                "reason": f"failed on first run: {type(exc).__name__}: {first}"})
        bar.update(runs)
    return [c for c in cases if (c.backend, c.mode) not in failed]


def round_order(cases: list, round_index: int) -> list:
    """The cases of one round, rotated by the round's index: each case is first as often as the others,
    so no case always runs right after the same one (a fixed order can bias the paired ratios)."""
    shift = round_index % len(cases) if cases else 0
    return cases[shift:] + cases[:shift]


def _timed_passes(cases: list[Case], pair, noise, options: BenchOptions, bar) -> None:
    """Pass 1 (loop and end to end, with peak memory) then pass 2 (per engine call), round-robin over cases."""
    device = torch.device(options.device)
    for r in range(options.repeats):
        for case in round_order(cases, r):
            bar.set_postfix_str(f"timed {case.backend} {case.plan.label}")
            with PeakMemory(device) as peak:
                timing = _run_once(case, pair, noise, device, options.end_to_end)
            for key, value in timing.items():
                case.times[key].append(value)
            if case.peak is None or (peak.rss_peak, peak.allocated_peak) > (case.peak.rss_peak, case.peak.allocated_peak):
                case.peak = peak
            bar.update()
    for r in range(options.repeats):
        for case in round_order(cases, r):  # a graph replays without returning to Python: per-step times come from "loop"
            bar.set_postfix_str(f"per-step {case.backend} {case.plan.label}")
            if case.runner is None:
                _per_step_pass(case, pair, noise, device)
            bar.update()


def run_bench(pair, options: BenchOptions, baseline_rss: int | None = None) -> dict:
    """Measure every requested case on a loaded pair; returns the report (see write_outputs)."""
    from tqdm.auto import tqdm

    family, device = pair.family, torch.device(options.device)
    frames, height, width = (family_default if value is None else value for value, family_default in
                             ((options.frames, family.frames), (options.height, family.height),
                              (options.width, family.width)))
    latent_shape = family.latent_shape(frames, height, width)
    steps = family.steps if options.steps is None else options.steps
    guidance = family.guidance if options.guidance is None else options.guidance
    plans = resolve_plans(options, steps)
    if not any(p.count("small") == 0 for p in plans):
        plans.insert(0, BlendPlan.parse("LLL", steps))  # the reference is always measured
    reference_plan = next(p for p in plans if p.count("small") == 0)
    sampler_kwargs = family.sampler_kwargs(latent_shape)
    per_step = {m: step_flops(family.transformer_class, dict(t.config), latent_shape, family.text_len, guidance > 1)
                for m, t in pair.transformers.items()}
    noise = torch.randn((1, *latent_shape), generator=torch.Generator("cpu").manual_seed(0)).to(device)
    load_start = os.getloadavg()

    eager = make_engines("torch", pair, options, latent_shape, guidance)
    blended_plan = next((p for p in plans if p.count("small") and p.count("large")), plans[-1])
    memory = _memory_budget(pair, eager, blended_plan, sampler_kwargs, guidance, noise, options, baseline_rss)

    cases, skipped = _build_cases(pair, eager, plans, options, latent_shape, guidance, sampler_kwargs)
    units = len(cases) * (max(options.warmup, 1) + 2 * options.repeats) + 12 * options.overhead_repeats + 4
    bar = tqdm(total=units, desc="bench", unit="run", disable=not options.progress)
    cases = _warm_up(cases, pair, noise, options, skipped, bar)
    _timed_passes(cases, pair, noise, options, bar)

    overhead = []
    if options.overhead_repeats:
        bar.set_postfix_str("runtime overhead")
        modules = {m: e.module for m, e in eager.items()}
        text_shape = (family.text_len, family.text_dim)
        overhead.append(measure_overhead(modules, blended_plan, sampler_kwargs, guidance, latent_shape, text_shape,
                                         options.overhead_repeats, device, f"{family.name} pair",
                                         with_mask=family.takes_text_mask))
        overhead.append(_tiny_wan_overhead(options, sampler_kwargs, guidance, steps, device))
    bar.update(bar.total - bar.n)
    bar.close()

    report = {"schema": 1, "machine": machine_info(device), "load_average": {"start": load_start, "end": os.getloadavg()},
              "pair": {"name": family.name, "sources": pair.sources, "frames": frames, "height": height, "width": width,
                       "latent_shape": list(latent_shape), "steps": steps, "guidance": guidance,
                       "text_len": family.text_len, **sampler_kwargs},
              "options": {**{k: v for k, v in asdict(options).items() if k != "dtype"},
                          "dtype": str(options.dtype).replace("torch.", "")},
              "flops": {"convention": "2 FLOPs per MAC, linear/conv layers and attention matmuls, CFG counted",
                        "per_step": per_step, "reference_plan": reference_plan.label},
              "cases": _case_rows(cases, per_step, reference_plan, frames, device),
              "skipped": skipped, "memory": memory, "overhead": overhead}
    report["targets"] = _targets(report)
    return report


def paired_speedup(reference: list[float], case: list[float]) -> float:
    """Median over repeats of reference time / case time, each pair from the same round-robin round.

    A shared CPU drifts in speed by 10-20% over a run (the reference's loop spans 0.45-0.61 s in
    one toy run); cases of one round run back to back, so their ratio cancels what the round had
    in common, which a ratio of two medians taken over the whole run does not."""
    return statistics.median(paired_ratios(reference, case))


def paired_ratios(reference: list[float], case: list[float]) -> list[float]:
    """Reference time / case time per round (what paired_speedup takes the median of)."""
    if len(reference) != len(case) or not case:
        raise ValueError(f"paired repeats differ in number: {len(reference)} vs {len(case)}")
    return [r / c for r, c in zip(reference, case)]


def _quartiles(values: list[float]) -> list[float] | None:
    return [q for i, q in enumerate(statistics.quantiles(values, n=4)) if i != 1] if len(values) >= 2 else None


def _case_rows(cases: list[Case], per_step: dict, reference_plan: BlendPlan, frames: int, device) -> list[dict]:
    ref = next(c for c in cases if (c.backend, c.mode, c.plan) == ("torch", "loop", reference_plan))
    ref_loop = statistics.median(ref.times["loop"])
    lll_flops = reference_plan.flops(per_step)
    rows = []
    for c in cases:
        loop, e2e = statistics.median(c.times["loop"]), statistics.median(c.times["e2e"])
        speedup_loop = paired_speedup(ref.times["loop"], c.times["loop"])
        flops = c.plan.flops(per_step)
        ideal = lll_flops / flops
        row = {"backend": c.backend, "mode": c.mode, "plan": c.plan.spec or c.plan.label, "stages": c.plan.label,
               "reference": c is ref, "large_steps": c.plan.count("large"), "small_steps": c.plan.count("small"),
               "flops": flops, "ideal_speedup": ideal,
               "loop_s": _stats(c.times["loop"]), "e2e_s": _stats(c.times["e2e"]),
               "loop_rounds_s": list(c.times["loop"]),  # in round order: pairs with the reference's rounds
               "encode_s": statistics.median(c.times["encode"]), "decode_s": statistics.median(c.times["decode"]),
               "speedup_loop": speedup_loop, "speedup_e2e": paired_speedup(ref.times["e2e"], c.times["e2e"]),
               "speedup_loop_of_medians": ref_loop / loop,
               "realized_fraction": speedup_loop / ideal, "seconds_per_frame": e2e / frames,
               "realized_quartiles": [q / ideal for q in _quartiles(paired_ratios(ref.times["loop"], c.times["loop"]))
                                      or []] or None,
               "step_ms": {m: {k: (v * 1e3 if k != "n" else v) for k, v in _stats(s).items()}
                           for m, s in c.step_seconds.items() if s},
               "engine_share": statistics.median(c.engine_share) if c.engine_share else None,
               "first_run_s": c.first_run_s, "peak_rss_bytes": c.peak.rss_peak}
        if c.runner is not None:  # same noise and prompt as the eager loop of this backend and plan
            eager = next((e for e in cases if (e.backend, e.mode, e.plan) == (c.backend, "loop", c.plan)), None)
            if eager is not None:
                row["max_abs_diff_vs_loop"] = float((c.runner.latents.float() - eager.sampler.buffers.latents.float())
                                                    .abs().max())
        if device.type == "cuda":
            row.update(max_allocated_bytes=c.peak.allocated_peak, max_reserved_bytes=c.peak.reserved_peak)
        rows.append(row)
    return rows


def _targets(report: dict) -> list[dict]:
    out = []
    lsl = next((r for r in report["cases"] if (r["backend"], r["mode"], r["stages"]) == ("torch", "loop", _lsl_label(report))),
               None)
    if lsl:
        out.append({"name": "LSL realized speedup / FLOP-ideal (eager, loop)", "target": f">= {TARGETS['realized_fraction']:.0%}",
                    "measured": f"{lsl['realized_fraction']:.1%} ({lsl['speedup_loop']:.2f}x of {lsl['ideal_speedup']:.2f}x"
                    + (f"; rounds' quartiles {lsl['realized_quartiles'][0]:.0%}-{lsl['realized_quartiles'][1]:.0%}"
                       if lsl.get("realized_quartiles") else "") + ")",
                    "value": lsl["realized_fraction"], "met": lsl["realized_fraction"] >= TARGETS["realized_fraction"]})
    if report["overhead"]:
        o = report["overhead"][0]
        out.append({"name": f"runtime overhead vs bare loop ({o['size']})", "target": f"<= {TARGETS['overhead_percent']:g}%",
                    "measured": f"{o['overhead_percent']:+.2f}%", "met": o["overhead_percent"] <= TARGETS["overhead_percent"]})
    m = report["memory"]
    if m:
        out.append({"name": f"peak memory of the blended run ({m['plan']})", "target": f"<= {_mib(m['bound_bytes'])} "
                    "(weights" + (" and engine constants" if any((m.get("engine_constants_bytes") or {}).values()) else "")
                    + " + large activations + buffers)", "measured": _mib(m["measured_bytes"]), "met": m["met"]})
    return out


def _measured_what(memory: dict) -> str:
    """How the measured figure was taken (reports before engine constants existed say it without them)."""
    what = memory["measured"]
    if any((memory.get("engine_constants_bytes") or {}).values()) and "engine constants" not in what:
        what = what.replace("weights + ", "weights + engine constants + ", 1)
    return what


def _lsl_label(report: dict) -> str:
    return BlendPlan.parse("LSL:0.4,0.2", report["pair"]["steps"]).label


def _peak(row: dict) -> str:
    if "max_allocated_bytes" in row:
        return f"{_mib(row['max_allocated_bytes'])} allocated, {_mib(row['max_reserved_bytes'])} reserved"
    return f"{_mib(row['peak_rss_bytes'])} RSS"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def equivalent_command(pair: str, options: BenchOptions) -> str:
    """The `flowblend bench` command line that reproduces a run (recorded in the report)."""
    parts = ["flowblend bench", f"--pair {pair}"]
    parts += [f"--backend {b}" for b in options.backends] + [f"--mode {m}" for m in options.modes]
    parts += [f"--plan {p}" for p in options.plans] + [f"--plan-file {p}" for p in options.plan_files]
    for flag in ("steps", "frames", "height", "width", "guidance"):
        if getattr(options, flag) is not None:
            parts.append(f"--{flag} {getattr(options, flag)}")
    parts += [f"--warmup {options.warmup}", f"--repeats {options.repeats}",
              f"--overhead-repeats {options.overhead_repeats}", f"--device {options.device}"]
    return " ".join(parts)


# -- output ----------------------------------------------------------------------------------------
def render_markdown(report: dict, heading: str = "##") -> str:
    """Results table, targets, memory terms and runtime overhead, with the machine and the command."""
    mach, pair = report["machine"], report["pair"]
    hw = mach.get("gpu") or mach["cpu"]
    lines = [f"{heading} Benchmark: {pair['name']} pair, {pair['frames']} frames {pair['width']}x{pair['height']}, "
             f"{pair['steps']} steps, CFG {pair['guidance']}", "",
             f"Machine: {hw}, {mach['cores']} cores ({mach['torch_threads']} torch threads), torch {mach['torch']}"
             + (f", CUDA {mach['cuda']}" if "cuda" in mach else "")
             + (f", fused step kernel {'on' if mach['fused_step_kernel'] else 'off (not built)'}"
                if "fused_step_kernel" in mach else "") + f", {report['options']['dtype']}, "
             f"{report['options']['device']}. Load average at start/end: "
             f"{report['load_average']['start'][0]:.2f} / {report['load_average']['end'][0]:.2f}.", "",
             f"Command: `{report.get('command', '(Python API)')}`", "",
             "Models: " + "; ".join(f"{m}: {src}" for m, src in pair["sources"].items())
             + (f". {report['note'][0].upper()}{report['note'][1:]}." if report.get("note") else "."), "",
             "Loop: the denoising loop alone; end to end: text encoding + loop + decode"
             + ("" if report["options"]["end_to_end"] else " (not measured: no text encoder / VAE, end to end = loop)")
             + f". Medians of {report['options']['repeats']} repeats visited round-robin (each round starts one case later), after "
             f"{max(report['options']['warmup'], 1)} warm-up run(s). Speedups are against eager PyTorch "
             f"{report['flops']['reference_plan']} measured in the same run: the median over repeats of the "
             "ratio within each round (\"of medians\": ratio of the two medians, for comparison); FLOP-ideal = LLL FLOPs / plan FLOPs "
             "(2 FLOPs per MAC, attention included, CFG counted); realized = measured speedup / FLOP-ideal. "
             "Per-step latencies come from a separate pass that times every engine call; \"outside engines\" is the "
             "share of that pass's loop time spent outside them (CFG combine, solver, Python). Eager PyTorch runs "
             "diffusers' modules as they are; for Wan its engines compute the rotary tables and the per-step "
             "timestep embeddings once when bound to the buffers instead of in every step "
             "(engines/wan_step.py; bitwise the same velocities).", "",
             "| backend | mode | plan | stages | GFLOPs | FLOP-ideal | loop s (min-max) | speedup (of medians) | realized "
             "| end to end s | s/frame | large step ms (min-max) | small step ms (min-max) | outside engines | peak memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(row, m):
        s = row["step_ms"].get(m)
        return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})" if s else "-"
    for r in report["cases"]:
        lines.append(f"| {r['backend']} | {r['mode']} | {r['plan']} | {r['stages']} | {r['flops'] / 1e9:.2f} | "
                     f"{r['ideal_speedup']:.2f}x | {r['loop_s']['median']:.3f} ({r['loop_s']['min']:.3f}-"
                     f"{r['loop_s']['max']:.3f}) | {r['speedup_loop']:.2f}x ({r.get('speedup_loop_of_medians', r['speedup_loop']):.2f}x) | "
                     f"{r['realized_fraction']:.0%} | "
                     f"{r['e2e_s']['median']:.3f} | {r['seconds_per_frame']:.4f} | {ms(r, 'large')} | {ms(r, 'small')} | "
                     f"{'-' if r['engine_share'] is None else format(1 - r['engine_share'], '.1%')} | "
                     f"{_peak(r)} |")
    first = {}
    for r in report["cases"]:
        first[r["backend"]] = first.get(r["backend"], 0.0) + (r["first_run_s"] or 0.0)
    lines.append("\nFirst (untimed) runs, all plans, per backend: " + ", ".join(f"{b} {t:.1f} s" for b, t in first.items())
                 + " (torch-compile compiles there; the inductor cache makes later processes faster).")
    graphs = [r for r in report["cases"] if "max_abs_diff_vs_loop" in r]
    if graphs:
        lines.append("\nGraph replays against the eager loop (same noise and prompt), max abs difference of the final "
                     "latents: " + ", ".join(f"{r['backend']} {r['mode']} {r['plan']} {r['max_abs_diff_vs_loop']:.1e}"
                                              for r in graphs) + ".")
    for s in report["skipped"]:
        lines.append(f"\nNot measured: {s['backend']} ({s['mode']}): {s['reason']}")
    lines += ["", f"{heading}# Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |" for t in report["targets"]]
    m = report["memory"]
    m, rss = report["memory"], report["memory"]["rss"]
    constants = m.get("engine_constants_bytes") or {}
    lines += ["", f"Memory terms ({m['plan']} loop): weights " + ", ".join(f"{k} {_mib(v)}" for k, v in m["weights_bytes"].items())
              + ("; engine constants (rotary tables and per-step timestep embeddings, precomputed at binding) "
                 + ", ".join(f"{k} {v / 2**10:.0f} KiB" for k, v in constants.items()) if any(constants.values()) else "")
              + f"; large-model activations {_mib(m['large_activations_bytes'])}; shared buffers "
              f"{_mib(m['shared_buffers_bytes'])}; bound {_mib(m['bound_bytes'])}; measured {_mib(m['measured_bytes'])} "
              f"({_measured_what(m)}). Resident memory: {_mib(rss['loaded_bytes'])} with the pair loaded, "
              f"+{_mib(rss['first_large_forward_growth_bytes'])} during the large model's first forward (allocator "
              f"caches and one-time kernel setup included), peak {_mib(rss['blended_peak_bytes'])} in the blended loop"
              + (f", {_mib(rss['process_growth_bytes'])} above the process before loading the pair."
                 if rss["process_growth_bytes"] else ".")]
    if report["overhead"]:
        lines += ["", f"{heading}# Runtime overhead", "",
                  "The blended runtime (shared buffers, CFG combine, solver table) against a bare loop over the same "
                  "modules (module call, CFG combine, diffusers scheduler step); interleaved repeats, each round "
                  "starting one variant later; loop times are medians, percentages the median of the per-round ratios. "
                  "\"Runtime\" runs each module's whole forward per step, so its difference to the bare loop is the "
                  "runtime's own overhead (the target); \"default\" is the engines as shipped, which for Wan compute "
                  "the rotary tables and timestep embeddings once per binding (bitwise the same velocities).", "",
                  "| size | plan | latents | repeats | bare loop ms | runtime loop ms | overhead | max abs diff "
                  "| default loop ms | default vs bare |",
                  "|---|---|---|---|---|---|---|---|---|---|"]

        def split(o):
            if not o.get("runtime_split_loop_ms"):
                return "- | -"
            return f"{o['runtime_split_loop_ms']:.2f} | {o['split_vs_bare_percent']:+.2f}%"
        lines += [f"| {o['size']} | {o['plan']} | {tuple(o['latent_shape'])} | {o['repeats']} | {o['bare_loop_ms']:.2f} "
                  f"| {o['runtime_loop_ms']:.2f} | {o['overhead_percent']:+.2f}% | {o['max_abs_diff_vs_bare']:.1e} "
                  f"| {split(o)} |" for o in report["overhead"]]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> None:
    """Two panels: loop time per case (min-max bars) and measured vs FLOP-ideal speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["cases"]
    labels = [f"{r['backend']}\n{r['mode']}\n{r['stages']}" for r in rows]
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(rows) + 4), 4.5))
    med = [r["loop_s"]["median"] for r in rows]
    err = [[m - r["loop_s"]["min"] for m, r in zip(med, rows)], [r["loop_s"]["max"] - m for m, r in zip(med, rows)]]
    ax1.bar(x, med, yerr=err, capsize=3, color="tab:blue")
    ax1.set(title="denoising loop (median, min-max)", ylabel="seconds", xticks=list(x))
    ax1.set_xticklabels(labels, fontsize=7)
    w = 0.4
    ax2.bar([i - w / 2 for i in x], [r["ideal_speedup"] for r in rows], w, label="FLOP-ideal", color="tab:gray")
    ax2.bar([i + w / 2 for i in x], [r["speedup_loop"] for r in rows], w, label="measured", color="tab:orange")
    ax2.axhline(1.0, color="k", lw=0.5)
    ax2.set(title=f"speedup vs eager {report['flops']['reference_plan']} (loop)", ylabel="x", xticks=list(x))
    ax2.set_xticklabels(labels, fontsize=7)
    ax2.legend(fontsize=8)
    hw = report["machine"].get("gpu") or report["machine"]["cpu"]
    fig.suptitle(f"flowblend bench: {report['pair']['name']} pair on {hw}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_outputs(report: dict, out_dir: str | Path, stem: str = "bench") -> dict[str, Path]:
    """Write <stem>.json, <stem>.md and <stem>.png into out_dir (each atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "png": out / f"{stem}.png"}
    _replace_atomically(paths["json"], lambda p: p.write_text(json.dumps(report, indent=1, default=str)))
    _replace_atomically(paths["markdown"], lambda p: p.write_text(render_markdown(report)))
    _replace_atomically(paths["png"], lambda p: plot_report(report, p))
    return paths
