"""The real-size stage of the GPU run (issue #22): Wan 2.1 14B (40 blocks) + 1.3B (30 blocks) at
480x832x81 in BF16, CFG as batch 2, random weights made directly on the GPU.

Each stage is one row (PASS / FAIL / SKIPPED / TIMEOUT with its reason and figures). A stage that
cannot finish inside what is left of the budget is not started (TIMEOUT, with the seconds it
needed by the figures measured so far) and the later ones still run. Random weights: speed and
memory do not depend on trained values; the 50-step figures are projections (each step's measured
time x its count), labelled so, and honest only because the measured 3-step loop equals the sum of
its steps within 2% (checked, not assumed).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from flowblend.errors import FlowblendError

from ..assembly import EngineChoice, eager_choice, engines_over, runner_for, sampler_for
from ..runtime.plan import EXPERTS_AND_SMALL, BlendPlan
from ..runtime.sampler import SamplerOptions
from .cuda_memory import peak_attribution

FULL_LATENT = (16, 21, 60, 104)  # 480x832, 81 frames: Wan's VAE 4x temporal, 8x spatial
TEXT = (512, 4096)  # UMT5-XXL tokens x width
LOOP_PLAN = "L1,S1,L1"  # each model's step at least once, and a switch each way
PROJECTED = {"LLL": "LLL", "LSL": "LSL:0.4,0.2"}  # the paper's default boundaries
PROJECTED_STEPS = 50
LOOP_TOLERANCE = 0.02  # loop time == sum of its steps within 2%: what makes the projection honest
# FP8 vs BF16 at full size with random weights: regression bounds (issue #24), not quality claims.
FP8_VELOCITY_COSINE, FP8_LATENTS_COSINE = 0.99, 0.98
# Seconds measured on the H200 run of 2026-12-04, used before this run has its own figures.
PRIOR = {"large_step": 6.4, "small_step": 1.25, "build": 6.0, "capture_factor": 2.0}


def random_transformer(config: dict, device, dtype: torch.dtype, seed: int, family: str = "wan"):
    """The family's transformer with N(0, 0.02) weights created on `device` in `dtype` (no fp32 copy on the host)."""
    from accelerate import init_empty_weights

    from ..families import get_family

    with init_empty_weights(include_buffers=False):  # parameters on meta; RoPE tables stay real
        model = get_family(family).architecture.model_class()(**config)
    gen = torch.Generator(device).manual_seed(seed)
    for name, param in list(model.named_parameters()):
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        value = torch.empty(param.shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)
        setattr(owner, name.rpartition(".")[2], torch.nn.Parameter(value, requires_grad=False))
    return model.to(device).eval()


@dataclasses.dataclass(frozen=True)
class EngineOption:
    """A named engine option the stage times every model under: eager PyTorch engines on the stage's device and
    dtype with the `EngineChoice` fields in `engine` set (assembly/choice.py declares them; "dtype": "fp8" is
    FP8 block linears, engines/fp8.py, emulated off CUDA), made by the one assembly (assembly/run.py)."""

    name: str
    engine: dict = dataclasses.field(default_factory=dict, hash=False)  # EngineChoice fields: compile, dtype
    first_call_factor: float = 1.0  # first calls (cold, then warm cache) / steady step, for the budget

    @property
    def compile(self) -> str:
        return self.engine.get("compile", "none")

    @property
    def fp8(self) -> bool:
        """Whether the option quantizes (the FP8 precision's block linears): its results meet FP8's bounds."""
        from ..engines.kinds import precision

        return "dtype" in self.engine and precision(self.engine["dtype"]).quantizer is not None

    def choice(self, device: torch.device, dtype: torch.dtype) -> EngineChoice:
        """The EngineChoice of this option at the stage's device and dtype; FlowblendError where it cannot run."""
        from ..engines.iospec import dtype_name
        from ..engines.kinds import precision

        choice = dataclasses.replace(eager_choice(device, dtype_name(dtype)), **self.engine)
        if precision(choice.dtype).torch_dtype != dtype:  # the factory would cast the stage's own models
            raise FlowblendError(f"engine option {self.name} computes in {precision(choice.dtype).torch_dtype}, "
                                 f"the stage's models are {dtype}: run the stage in that dtype")
        return choice

    def make(self, models: dict[str, torch.nn.Module], device: torch.device, dtype: torch.dtype) -> dict:
        """This option's engines over `models` (model name -> transformer), by the one assembly."""
        return engines_over(models, self.choice(device, dtype), keep_originals=True)  # compared with BF16


# In the order they run: a stage that does not fit the budget is a TIMEOUT row, so the costliest
# (whole-model compile: 110 s first call at 14B on the H200) goes last.
FULLSIZE_OPTIONS = (EngineOption("eager"), EngineOption("regional", {"compile": "regional"}, first_call_factor=4.0),
                    EngineOption("regional+fp8", {"compile": "regional", "dtype": "fp8"}, first_call_factor=5.0),
                    EngineOption("regional+fp8+fp8-attention", {"compile": "regional", "dtype": "fp8", "attention": "fp8"},
                                 first_call_factor=5.0),
                    EngineOption("whole", {"compile": "whole"}, first_call_factor=24.0))
FAST = "regional+fp8"  # the option the second blended loop runs under the whole-loop graph


@dataclasses.dataclass
class FullsizeSettings:
    configs: dict[str, dict]  # model name -> WanTransformer3DModel config (reference_configs)
    device: torch.device
    dtype: torch.dtype = torch.bfloat16
    latent: tuple = FULL_LATENT
    text: tuple = TEXT
    reps: int = 2
    budget_s: float = 210.0
    wan22_configs: dict[str, dict] | None = None
    options: tuple = FULLSIZE_OPTIONS
    fast: str = FAST  # the option whose blended loop runs beside the eager one

    def stage_names(self) -> list[str]:
        """Every row the stage writes, in order (the CPU run reports each SKIPPED)."""
        steps = lambda o: [f"step_{m}_{o.name}" for m in self.configs]  # noqa: E731
        names = ["build", *[n for o in self.options if o.name != "whole" for n in steps(o)]]
        names += [f"loop_{n}" for n in dict.fromkeys(("eager", self.fast)) if n in {o.name for o in self.options}]
        names += ["projection"] + (["wan22"] if self.wan22_configs else [])
        return names + [n for o in self.options if o.name == "whole" for n in steps(o)]


class Clock:
    def __init__(self, budget_s: float):
        self.start, self.budget = time.monotonic(), budget_s

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_s(fn, device: torch.device, reps: int) -> list[float]:
    """Seconds of each of `reps` calls of fn (CUDA events on a GPU); the caller warms up."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begun = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begun)
    return times


def request(settings: FullsizeSettings, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, *settings.latent), generator=g)
    text = [torch.randn((1, *settings.text), generator=g).to(settings.device, settings.dtype) for _ in range(2)]
    return noise, text


def sampler_options() -> SamplerOptions:
    return SamplerOptions(solver="unipc", shift=3.0, guidance_scale=5.0, fused_kernel=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


class FullsizeStage:
    """Runs the stages in order into `rows`; `estimates` grow from this run's own figures."""

    def __init__(self, settings: FullsizeSettings):
        self.s, self.clock = settings, Clock(settings.budget_s)
        self.rows: dict[str, dict] = {}
        self.step_s: dict[tuple[str, str], float] = {}  # (model, option) -> steady seconds per CFG step
        self.velocity: dict[str, torch.Tensor] = {}  # model -> eager BF16 velocity at step 1 (the reference)
        self.eager_latents: torch.Tensor | None = None  # the eager loop's final latents (the FP8 loop's reference)
        self.models: dict[str, torch.nn.Module] = {}

    # -- bookkeeping ------------------------------------------------------------------------------
    def estimate(self, model: str) -> float:
        found = [v for (m, _), v in self.step_s.items() if m == model]
        if found:
            return min(found)
        return PRIOR["small_step" if model == "small" else "large_step"]

    def run(self, name: str, needs_s: float, fn: Callable[[], dict]) -> dict:
        if needs_s > self.clock.left():
            row = {"status": "timeout", "reason": f"not started: needs ~{needs_s:.0f} s by this run's figures, "
                                                  f"{max(self.clock.left(), 0):.0f} s left of the budget"}
        else:
            begun = time.monotonic()
            try:
                row = fn()
            except Exception as exc:  # noqa: BLE001 - a crashed stage is a failed row; the later ones still run
                row = {"status": "fail", "reason": f"{type(exc).__name__}: {exc}"}
            row["seconds"] = round(time.monotonic() - begun, 2)
        self.rows[name] = row
        print(f"{name}: {row['status'].upper()} {row.get('reason', '')}", flush=True)
        return row

    # -- stages -----------------------------------------------------------------------------------
    def build(self) -> dict:
        begun = time.monotonic()
        for seed, (name, config) in enumerate(self.s.configs.items()):
            self.models[name] = random_transformer(config, self.s.device, self.s.dtype, seed)
        sync(self.s.device)
        out = {"status": "pass", "build_s": round(time.monotonic() - begun, 2),
               "layers": {m: c["num_layers"] for m, c in self.s.configs.items()}}
        if self.s.device.type == "cuda":
            out["allocated_gib"] = torch.cuda.memory_allocated(self.s.device) / 2**30
        return out

    def first_call(self, model: str, engine, choice: EngineChoice) -> tuple:
        """(the engine's bound buffers, seconds of its first step): compilation happens here."""
        sampler = sampler_for({model: engine}, BlendPlan(tuple([model] * 2)), sampler_options(), choice)
        noise, text = request(self.s)
        bufs = sampler.load_request(noise, *text)
        begun = time.monotonic()
        engine.run(0)
        sync(self.s.device)
        return bufs, time.monotonic() - begun

    def per_step(self, model: str, option: EngineOption) -> dict:
        make = lambda: option.make({model: self.models[model]}, self.s.device, self.s.dtype)[model]  # noqa: E731
        try:
            engine = make()
        except FlowblendError as refused:  # e.g. FP8 on a GPU without FP8 tensor cores: its one line
            return {"status": "skipped", "reason": str(refused)}
        choice = option.choice(self.s.device, self.s.dtype)
        bufs, first = self.first_call(model, engine, choice)
        times = timed_s(lambda: engine.run(1), self.s.device, self.s.reps)
        self.step_s[model, option.name] = min(times)
        velocity = bufs.velocity.detach().float().flatten()
        out = {"status": "pass", "model": model, "option": option.name, "attention": engine.attention.describe(),
               "first_call_s": round(first, 3), "step_s": min(times), "all_s": times, "latent": list(self.s.latent),
               "cfg_batch": 2}
        if option.compile != "none":
            # The same option again as a restarted process would meet it: dynamo's in-memory cache cleared
            # (it would serve the new engine without compiling), inductor's compiled graphs cached from the first.
            torch._dynamo.reset()
            out["first_call_warm_cache_s"] = round(self.first_call(model, make(), choice)[1], 3)
            out["first_call_cold_cache"] = "a fresh TORCHINDUCTOR_CACHE_DIR (scripts/gpu_fullsize.py)"
        if option.name == "eager":
            self.velocity[model] = velocity.clone()
        elif model in self.velocity:  # the same inputs, step 1: how far the option moves the velocity
            out["velocity_cosine_vs_eager"] = torch.nn.functional.cosine_similarity(
                velocity.double(), self.velocity[model].double(), dim=0).item()
            if option.fp8 and out["velocity_cosine_vs_eager"] < FP8_VELOCITY_COSINE:
                out["status"], out["reason"] = "fail", (f"FP8 velocity cosine {out['velocity_cosine_vs_eager']:.4f} < "
                                                        f"{FP8_VELOCITY_COSINE} vs BF16 (random weights: a regression bound)")
        return out

    def loop(self, option: EngineOption) -> dict:
        """The 3-step blended loop eagerly vs in the whole-loop graph: replay == the same engines' eager
        loop; loop time == the sum of its steps; under FP8, final latents vs the BF16 eager loop's."""
        plan = BlendPlan.parse(LOOP_PLAN, 3)
        try:
            engines = option.make({m: self.models[m] for m in set(plan.models)}, self.s.device, self.s.dtype)
        except FlowblendError as refused:
            return {"status": "skipped", "reason": str(refused)}
        choice = option.choice(self.s.device, self.s.dtype)
        noise, text = request(self.s)
        eager = sampler_for(engines, plan, sampler_options(), choice)
        snapshot = MemoryHistory(self.s.device)
        with snapshot:
            reference = eager.sample(noise, *text)
            sync(self.s.device)
        eager.load_request(noise, *text)
        eager_s = timed_s(eager.run_loop, self.s.device, 1)[0]
        steps_sum = sum(self.step_s.get((m, option.name), self.estimate(m)) for m in plan.models)
        out = {"status": "pass", "option": option.name, "plan": plan.label, "eager_loop_s": eager_s,
               "sum_of_steps_s": steps_sum, "loop_vs_steps": eager_s / steps_sum - 1.0, "memory": snapshot.summary()}
        if option.name == "eager":
            self.eager_latents = reference
        elif option.fp8 and self.eager_latents is not None:
            a, b = reference.double().flatten(), self.eager_latents.double().flatten()
            out["final_latents_cosine_vs_bf16"] = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
            if out["final_latents_cosine_vs_bf16"] < FP8_LATENTS_COSINE:
                out["status"], out["reason"] = "fail", (f"FP8 loop's final latents cosine "
                                                        f"{out['final_latents_cosine_vs_bf16']:.4f} < {FP8_LATENTS_COSINE} "
                                                        "vs the BF16 loop (random weights: a regression bound)")
        if self.s.device.type != "cuda":
            out["loop_vs_steps_checked"] = "not on CPU: millisecond steps of tiny models are timing noise"
        elif abs(out["loop_vs_steps"]) > LOOP_TOLERANCE and out["status"] == "pass":
            out["status"], out["reason"] = "fail", (f"eager loop {eager_s:.2f} s vs sum of its steps {steps_sum:.2f} s: "
                                                    f"{out['loop_vs_steps']:+.1%}, beyond {LOOP_TOLERANCE:.0%}")
        if self.s.device.type != "cuda":
            out["graph"] = "skipped: CUDA graphs need a GPU"
            return out
        runner = runner_for(sampler_for(engines, plan, sampler_options(), choice), mode="whole")
        begun = time.monotonic()
        replayed = runner.sample(noise, *text)
        sync(self.s.device)
        out["graph_first_call_s"] = time.monotonic() - begun  # warm-up + capture + replay
        out["graph_rel_err_vs_eager"] = rel_err(replayed, reference)
        out["graph_equal_to_eager"] = bool(torch.equal(replayed, reference))
        out["graph_replay_s"] = timed_s(runner.replay, self.s.device, 1)[0]
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.s.device) / 2**30
        if out["graph_rel_err_vs_eager"] > 1e-5 and out["status"] == "pass":
            out["status"], out["reason"] = "fail", f"graph replay differs from eager: {out['graph_rel_err_vs_eager']:.2e}"
        return out

    def projection(self) -> dict:
        loop = self.rows.get("loop_eager", {})
        out = {"status": "pass" if loop.get("status") == "pass" else "skipped",
               "label": f"PROJECTION: each step's measured time x its count over {PROJECTED_STEPS} steps (no text "
                        "encoder, no VAE), honest because the measured loop equals the sum of its steps",
               "per_option": {}}
        if out["status"] != "pass":
            out["reason"] = "the loop stage did not pass, so the loop == sum-of-steps premise is unchecked"
            return out
        for option in dict.fromkeys(o for _, o in self.step_s):
            if ("large", option) in self.step_s and ("small", option) in self.step_s:
                per = {}
                for label, spelling in PROJECTED.items():
                    plan = BlendPlan.parse(spelling, PROJECTED_STEPS)
                    per[label] = sum(self.step_s[m, option] for m in plan.models)
                per["LSL/LLL speedup"] = per["LLL"] / per["LSL"]
                out["per_option"][option] = per
        return out

    def wan22(self) -> dict:
        """Wan 2.2 at full size: the second 14B expert beside the first (~60 GB), one step of each model."""
        configs = self.s.wan22_configs
        low = random_transformer(configs["low"], self.s.device, self.s.dtype, seed=7)
        models = {"high": self.models["large"], "low": low, "small": self.models["small"]}
        plan = BlendPlan(("high", "small", "low"), model_set=EXPERTS_AND_SMALL)
        eager = EngineOption("eager")
        engines = eager.make({m: models[m] for m in plan.models}, self.s.device, self.s.dtype)
        sampler = sampler_for(engines, plan, sampler_options(), eager.choice(self.s.device, self.s.dtype))
        noise, text = request(self.s)
        sampler.load_request(noise, *text)
        out = {"status": "pass", "step_s": {}}
        for i, model in enumerate(plan.models):
            out["step_s"][model] = timed_s(lambda i=i: engines[plan.models[i]].run(i), self.s.device, 1)[0]
        if self.s.device.type == "cuda":
            out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.s.device) / 2**30
        return out

    # -- the whole stage --------------------------------------------------------------------------
    def main(self) -> dict:
        self.run("build", PRIOR["build"], self.build)
        if self.rows["build"]["status"] != "pass":
            return self.rows
        options = {o.name: o for o in self.s.options}
        loop_models = BlendPlan.parse(LOOP_PLAN, 3).models
        for option in self.s.options:
            if option.name == "whole":
                continue  # last: see FULLSIZE_OPTIONS
            self.per_step_rows(option)
        for name in dict.fromkeys(("eager", self.s.fast)):
            if name in options:
                loop_s = sum(self.step_s.get((m, name), self.estimate(m)) for m in loop_models)
                self.run(f"loop_{name}", loop_s * (3 + PRIOR["capture_factor"]) + 10,
                         lambda o=options[name]: self.loop(o))
        self.run("projection", 0, self.projection)
        if self.s.wan22_configs:
            self.run("wan22", PRIOR["build"] + 2 * self.estimate("large") + self.estimate("small"), self.wan22)
        if "whole" in options:
            self.per_step_rows(options["whole"])
            self.rows["projection"] = self.projection()  # with the whole-compile steps, where they ran
        return self.rows

    def per_step_rows(self, option: EngineOption) -> None:
        for model in self.s.configs:
            need = self.estimate(model) * (self.s.reps + option.first_call_factor)
            self.run(f"step_{model}_{option.name}", need, lambda m=model, o=option: self.per_step(m, o))


class MemoryHistory:
    """torch.cuda.memory's allocation history over a region, summarised at its peak (bench/cuda_memory.py)."""

    def __init__(self, device: torch.device):
        self.device, self.snapshot, self.error = device, None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python", device=self.device)
            except Exception as exc:  # noqa: BLE001 - a private API: say why there is no summary, go on
                self.error = f"{type(exc).__name__}: {exc}"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda" and self.error is None:
            try:
                self.snapshot = torch.cuda.memory._snapshot(self.device)
            finally:
                torch.cuda.memory._record_memory_history(enabled=None)

    def summary(self) -> dict:
        if self.device.type != "cuda":
            return {"status": "skipped", "reason": "the CUDA allocator's history exists only on a GPU"}
        if self.snapshot is None:
            return {"status": "skipped", "reason": f"no snapshot: {self.error}"}
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        out = peak_attribution(self.snapshot, index)
        out["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out
