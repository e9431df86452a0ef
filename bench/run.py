"""Benchmark of blended sampling against eager PyTorch LLL: speed, FLOPs, memory, runtime overhead.

Drives the runtime from above. Every (backend, mode, plan) case shares its backend's engines; eager
PyTorch LLL is always measured in the same run as the reference, and the timed repeats visit the
cases round-robin so slow drift (another process, clocks) spreads over all of them. Three passes:
1. timed: end to end (text encoding + loop + decode) with the loop timed on its own;
2. per-step: the same loop through timing wrappers around each engine call (perf_counter on CPU,
   torch.cuda.Event on GPU), kept apart so the wrappers never disturb pass 1;
3. what the runtime itself costs (bench/runtime_cost.py): its loop against a bare loop over the
   same modules, at the pair's size and at a tiny Wan size, and its memory against its terms.
The report (rows, targets, markdown, PNG) is bench/report.py's; `flowblend bench` is a
thin CLI over `bench_pair_by_name` and `bench_report.write_outputs`.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from flowblend.errors import FlowblendError

from ..assembly import EngineChoice, engines_for, load_models, runner_for, sampler_for
from ..engines.factory import BACKENDS, torch_dtype
from ..engines.kinds import REFERENCE_KIND, engine_kind
from ..resolve.blend_request import BlendChoices
from ..resolve.resolved import ResolvedRequest, resolve_request
from ..runtime.graph import GraphRunner
from ..runtime.graph_modes import BENCH_MODES
from ..runtime.guidance import guidance_table
from ..runtime.plan import BlendPlan
from ..runtime.sampler import Sampler
from .flops import cached_step_flops, step_flops
from .memory import PeakMemory, current_rss_bytes
from .pairing import round_order
from .plans import DEFAULT_PLANS, bench_plans
from .report import case_rows, targets
from .runtime_cost import measure_overhead, memory_budget, sync_device, tiny_wan_overhead

MODES = BENCH_MODES  # bench mode -> runtime/graph.py mode
DEFAULT_BACKENDS = ("torch", "torch-compile")
PROMPT = "a red circle moving left"


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
    guidance: float | None = None  # two-expert pairs: the high-noise expert's (the low one keeps the family's)
    boundary_ratio: float | None = None  # two-expert pairs: default the family's
    warmup: int = 1
    repeats: int = 3
    overhead_repeats: int = 10
    engine: EngineChoice = EngineChoice()  # the engine options (assembly/); each backend's choice is `choice_for`
    end_to_end: bool = True  # False where the pair has no real text encoder / VAE (scripts/gpu_bench.py)
    progress: bool = True

    @property
    def device(self) -> str:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype the pair loads in: the engine choice's precision's (fp8 computes in bfloat16)."""
        return torch_dtype(self.engine.dtype)

    def choice_for(self, backend: str) -> EngineChoice:
        """The engine choice of one measured backend; the reference is eager whatever --compile says (bench
        a compile option with --backend torch-compile)."""
        return replace(self.engine, backend=backend, **({"compile": "none"} if backend == REFERENCE_KIND else {}))

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
        self.device, self.dtype = engine.device, engine.dtype

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
    request: ResolvedRequest  # resolve/resolved.py's value, as generate and the server hold it: plan, guidance...
    sampler: Sampler
    timed_sampler: Sampler
    step_log: list
    times: dict = field(default_factory=lambda: {k: [] for k in ("encode", "loop", "decode", "e2e")})
    step_seconds: dict = field(default_factory=dict)  # model name -> seconds of each of its engine calls
    engine_share: list = field(default_factory=list)
    peak: PeakMemory | None = None
    first_run_s: float | None = None  # the first warm-up run: includes compilation for torch-compile
    runner: GraphRunner | None = None  # graph modes: captures on the first run, then replays
    attention: str = ""  # the attention kernel its engines run (engines/attention.py), or where it is decided

    @property
    def plan(self) -> BlendPlan:
        return self.request.plan


# -- engines per backend ---------------------------------------------------------------------------
def attention_of(choice: EngineChoice) -> str:
    """What the report says of a backend's attention: the kernel its PyTorch engines choose, or its compiler's."""
    from ..engines.attention import choose_attention

    if not choice.runs_transformers:
        return f"chosen inside the {choice.backend} engine"
    return choose_attention(choice.device, torch_dtype(choice.dtype), choice.attention).describe()


def bench_engines(backend: str, pair, options: BenchOptions, latent_shape, guidance: float) -> dict:
    """Engines for a backend, exported and built first where the store lacks them, or Unavailable with the reason."""
    if engine_kind(backend).needs_cuda and not options.device.startswith("cuda"):
        raise Unavailable("TensorRT needs a CUDA GPU (--device cuda)")
    try:
        return engines_for(pair, options.choice_for(backend), latent_shape, guidance, build=True,
                           progress=options.progress, keep_originals=True)  # every backend over the same pair
    except ImportError as exc:
        raise Unavailable(f"{backend} backend not importable here ({exc})") from None
    except FlowblendError as exc:
        raise Unavailable(str(exc)) from None


def _check_mode(mode: str, device: torch.device) -> None:
    if MODES[mode] == "eager":
        return
    if device.type != "cuda":
        raise Unavailable("CUDA graphs need a CUDA device (--device cuda)")


# -- measurement -----------------------------------------------------------------------------------
@torch.no_grad()
def _run_once(case: Case, pair, noise, device, end_to_end: bool, sampler: Sampler | None = None) -> dict:
    sampler = sampler or case.sampler
    t0 = time.perf_counter()
    embeds, mask = pair.encode_prompt([PROMPT, ""])
    sync_device(device)
    t1 = time.perf_counter()
    masks = {} if mask is None else {"prompt_mask": mask[0:1], "negative_prompt_mask": mask[1:2]}
    runner = case.runner if sampler is case.sampler else None  # the per-step pass runs eagerly
    (runner.load if runner else sampler.load_request)(noise, embeds[0:1], embeds[1:2], **masks)
    sync_device(device)
    t2 = time.perf_counter()
    if runner:
        runner.replay()
    else:
        sampler.run_loop()
    sync_device(device)
    t3 = time.perf_counter()
    if end_to_end:
        pair.decode(sampler.buffers.latents)
        sync_device(device)
    t4 = time.perf_counter()
    return {"encode": t1 - t0, "loop": t3 - t2, "decode": t4 - t3, "e2e": (t4 - t0) if end_to_end else (t3 - t2)}


def _per_step_pass(case: Case, pair, noise, device) -> None:
    case.step_log.clear()
    timing = _run_once(case, pair, noise, device, False, case.timed_sampler)
    total = 0.0
    for entry in case.step_log:
        seconds = entry[1].elapsed_time(entry[2]) / 1e3 if len(entry) == 3 else entry[1]
        case.step_seconds.setdefault(entry[0], []).append(seconds)
        total += seconds
    case.engine_share.append(total / timing["loop"])




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
        from ..runtime.fused import load_library

        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    fused_step_kernel=load_library() is not None)  # the Sampler uses it on CUDA when built
    return info


def bench_pair_by_name(name: str, options: BenchOptions, large: str | None = None, small: str | None = None,
                       allow_download: bool = False) -> dict:
    """Load a registered pair and benchmark it; the RSS before loading is the memory baseline."""
    import diffusers

    from ..families import get_family

    getattr(diffusers, get_family(name).transformer_class)  # import the model code before the baseline
    baseline = current_rss_bytes()
    # the transformers always: eager torch is measured as the reference, and compiled backends export from them
    pair = load_models(name, options.engine, large, small, allow_download, with_transformers=True)
    return run_bench(pair, options, baseline_rss=baseline)


def _build_cases(pair, eager: dict, requests: list[ResolvedRequest], options: BenchOptions, latent_shape,
                 guidance: float) -> tuple[list[Case], list[dict]]:
    """One Case per (backend, mode, plan's resolved request) that can run here; the rest listed with the reason."""
    device = torch.device(options.device)
    cases, skipped = [], []
    for backend in dict.fromkeys((REFERENCE_KIND,) + tuple(options.backends)):
        try:
            engines = eager if backend == REFERENCE_KIND else bench_engines(backend, pair, options, latent_shape, guidance)
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
            for request in requests:
                choice = options.choice_for(backend)
                make = lambda e: sampler_for(e, request.plan, request.options, choice)  # noqa: E731
                case = Case(backend, mode, request, make(engines), make(timed), log, attention=attention_of(choice))
                if MODES[mode] != "eager":
                    case.runner = runner_for(case.sampler, MODES[mode])
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
                if (case.backend, case.mode) == (REFERENCE_KIND, "loop"):
                    raise
                failed.add((case.backend, case.mode))
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                skipped.append({"backend": case.backend, "mode": case.mode,
                                "reason": f"failed on first run: {type(exc).__name__}: {first}"})
        bar.update(runs)
    return [c for c in cases if (c.backend, c.mode) not in failed]


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
    sampler_kwargs = family.sampler_kwargs(latent_shape)
    plans, reference_plan, experts, scales = bench_plans(family, options.plans, options.plan_files, steps,
                                                         sampler_kwargs, guidance, options.boundary_ratio)
    cfg = max(max(guidance_table(p, guidance, scales, experts)) for p in plans) > 1
    per_step = {m: step_flops(family.transformer_class, dict(t.config), latent_shape, family.text_len, cfg)
                for m, t in pair.transformers.items()}
    per_cached = {m: cached_step_flops(family.transformer_class, dict(t.config), latent_shape, family.text_len, cfg)
                  for m, t in pair.transformers.items()}  # what a cached step still runs (engines/step_cache.py)
    noise = torch.randn((1, *latent_shape), generator=torch.Generator("cpu").manual_seed(0)).to(device)
    load_start = os.getloadavg()

    eager = bench_engines(REFERENCE_KIND, pair, options, latent_shape, guidance)
    blended_plan = next((p for p in plans if p.count("small") and len(set(p.models)) > 1), plans[-1])
    memory = memory_budget(pair, eager, blended_plan, sampler_kwargs, guidance, noise,
                           options.choice_for(REFERENCE_KIND), PROMPT, baseline_rss, largest=family.models[0])

    choices = BlendChoices(steps=options.steps, frames=frames, height=height, width=width, guidance=guidance,
                           boundary_ratio=options.boundary_ratio)  # each plan's request, resolved as generate's
    requests = [resolve_request(family, choices, PROMPT, plan=plan) for plan in plans]
    cases, skipped = _build_cases(pair, eager, requests, options, latent_shape, guidance)
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
        overhead.append(tiny_wan_overhead(5 * options.overhead_repeats, sampler_kwargs, guidance, steps, device))
    bar.update(bar.total - bar.n)
    bar.close()

    report = {"schema": 1, "machine": machine_info(device), "load_average": {"start": load_start, "end": os.getloadavg()},
              "pair": {"name": family.name, "models": list(family.models), "sources": pair.sources, "frames": frames, "height": height, "width": width,
                       "latent_shape": list(latent_shape), "steps": steps, "guidance": guidance,
                       "text_len": family.text_len, **sampler_kwargs,
                       **({"boundary_ratio": experts.boundary_ratio, "expert_switch_step": experts.switch_step,
                           "expert_guidance": scales} if experts is not None else {})},
              "blended_stages": blended_plan.label,
              "options": {**{k: v for k, v in asdict(options).items() if k != "engine"}, **options.engine.to_dict(),
                          "torch_dtype": str(options.dtype).replace("torch.", "")},
              "flops": {"convention": "2 FLOPs per MAC, linear/conv layers and attention matmuls, CFG counted",
                        "per_step": per_step, "reference_plan": reference_plan.label},
              "cases": case_rows(cases, per_step, reference_plan, frames, device, per_cached),
              "skipped": skipped, "memory": memory, "overhead": overhead,
              # how the engines hold the pair's tensors (bench/memory_terms.py predicts the weights from it): as
              # loaded since f0a6aa0; before, the engine factory cast every floating tensor to the run's dtype
              "weights_layout": "as loaded"}
    report["targets"] = targets(report)
    return report




def equivalent_command(pair: str, options: BenchOptions) -> str:
    """The `flowblend bench` command line that reproduces a run (recorded in the report)."""
    parts = ["flowblend bench", f"--pair {pair}"]
    parts += [f"--backend {b}" for b in options.backends] + [f"--mode {m}" for m in options.modes]
    parts += [f"--plan {p}" for p in options.plans] + [f"--plan-file {p}" for p in options.plan_files]
    for flag in ("steps", "frames", "height", "width", "guidance", "boundary_ratio"):
        if getattr(options, flag) is not None:
            parts.append(f"--{flag.replace('_', '-')} {getattr(options, flag)}")
    parts += [f"--warmup {options.warmup}", f"--repeats {options.repeats}",
              f"--overhead-repeats {options.overhead_repeats}", f"--device {options.device}"]
    return " ".join(parts)
