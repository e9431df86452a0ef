"""What the runtime itself costs: its loop time over a bare loop of the same modules, and its
memory against weights + engine constants + the large model's activations + the shared buffers.

Measured by `flowblend bench` (bench/run.py) after its timed cases.
"""
from __future__ import annotations

import contextlib
import statistics
import time

import torch

from ..assembly import EngineChoice, as_loaded, engines_over, sampler_for
from ..runtime.plan import BlendPlan
from ..runtime.sampler import Sampler, SamplerOptions
from ..runtime.solvers import scheduler_for
from .memory import (
    LiveTensorBytes,
    MemoryBound,
    PeakMemory,
    blas_workspace_bytes,
    current_rss_bytes,
    module_bytes,
    tensors_bytes,
)
from .pairing import paired_ratios, round_order
from .tiny import TEXT, WAN_LATENT, tiny_pair


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_overhead(modules: dict, plan: BlendPlan, sampler_kwargs: dict, guidance: float, latent_shape,
                     text_shape, repeats: int, device: torch.device, label: str, with_mask: bool = False) -> dict:
    """Blended runtime vs a bare loop over the same signature modules, in paired rotated rounds (bench/pairing.py).

    The runtime is timed twice: with engines running each module's whole forward (what it adds
    over the bare loop: its overhead) and with the default engines, which for Wan and LTX compute
    the schedule constants once per binding (families/wan_step.py, ltx_step.py; what a user gets).
    """
    sampler_options = SamplerOptions(guidance_scale=guidance, **sampler_kwargs)
    choice = as_loaded(modules, device)  # eager engines over the modules as they are: nothing moved or cast
    samplers = {split: sampler_for(engines_over(modules, choice, split_constants=split), plan, sampler_options)
                for split in (False, True)}
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
        sync_device(device)
        t0 = time.perf_counter()
        for i, t in enumerate(scheduler.timesteps):
            x = torch.cat([latents, latents]) if cfg else latents
            v = modules[plan.models[i]](x, t.expand(x.shape[0]).to(device), text, *extra)
            if cfg:
                v_cond, v_uncond = v.chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
        sync_device(device)
        return time.perf_counter() - t0, latents

    def blended(sampler: Sampler) -> tuple[float, torch.Tensor]:
        sampler.load_request(noise, cond, uncond if cfg else None, **masks)
        sync_device(device)
        t0 = time.perf_counter()
        sampler.run_loop()
        sync_device(device)
        return time.perf_counter() - t0, sampler.buffers.latents

    split_engines = any(e.step_split is not None for e in samplers[True].engines.values())
    runs = {"bare": bare, "runtime": lambda: blended(samplers[False])}
    if split_engines:
        runs["split"] = lambda: blended(samplers[True])
    _, ref = bare()
    diffs = {name: float((ref - runs[name]()[1]).abs().max()) for name in runs if name != "bare"}
    times = {name: [] for name in runs}
    for r in range(repeats):
        for name in round_order(list(runs), r):
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


def tiny_wan_overhead(repeats: int, sampler_kwargs: dict, guidance: float, steps: int, device) -> dict:
    from ..engines.signature import signature_for

    modules = {m: signature_for(module).to(device) for m, module in tiny_pair("wan").items()}
    plan = BlendPlan.parse("LSL:0.4,0.2", steps)
    kwargs = {k: v for k, v in sampler_kwargs.items() if k != "mu"}
    return measure_overhead(modules, plan, kwargs, guidance, WAN_LATENT, TEXT,
                            repeats, device, "tiny Wan")


@torch.no_grad()
def memory_budget(pair, engines: dict, plan: BlendPlan, sampler_kwargs: dict, guidance: float, noise,
                  choice: EngineChoice, prompt: str, baseline_rss: int | None, largest: str = "large") -> dict:
    """The blended run's peak against weights of every model + the `largest` model's activations + buffers.

    Taken before any other backend exists (a compiler's own memory is not the runtime's), over the
    benchmark's blended plan. Activations are CUDA allocator peaks on GPU and live tensor storages
    on CPU (LiveTensorBytes); RSS is reported too. Constants an engine precomputes per binding
    (families/wan_step.py, ltx_step.py) are counted with its weights, as a compiler's folded constants would be.
    On CUDA two more terms (bench/memory.py MemoryBound): what was allocated before this began beyond
    the weights (the caller's tensors, workspaces of streams already used), and the BLAS workspace the
    loop's own stream allocates on its first matmul (blas_workspace_bytes).
    """
    device = torch.device(choice.device)  # `choice`: the eager engines' (bench/run.engine_choice)
    rss_loaded = current_rss_bytes()  # models loaded, no buffers yet
    weights = {m: module_bytes(t) for m, t in pair.transformers.items()}
    held_before, workspace = 0, 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        held_before = (torch.cuda.memory_allocated(device) - sum(weights.values())
                       - sum(engines[m].constants_bytes() for m in pair.transformers))
        workspace = blas_workspace_bytes(torch.cuda.get_device_capability(device))  # the new Sampler's own stream
    sampler = sampler_for(engines, plan, SamplerOptions(guidance_scale=guidance, **sampler_kwargs), choice)
    embeds, mask = pair.encode_prompt([prompt, ""])
    masks = {} if mask is None else {"prompt_mask": mask[0:1], "negative_prompt_mask": mask[1:2]}
    bufs = sampler.load_request(noise, embeds[0:1], embeds[1:2], **masks)
    buffers = tensors_bytes([bufs.latents, bufs.model_input, bufs.text_embeds, bufs.text_mask, bufs.timestep_table,
                             bufs.guidance_table, bufs.velocity, bufs.guided, *bufs.state.values()])
    constants = {m: engines[m].constants_bytes() for m in pair.transformers}  # eager TorchEngines, see above
    residuals = sum(getattr(engines[m], "residual_bytes", lambda: 0)() for m in pair.transformers)  # cached steps
    tracked = {}
    for region, run in (("forward", lambda: engines[largest].run(0)), ("blended", sampler.run_loop)):
        live = LiveTensorBytes() if device.type == "cpu" else contextlib.nullcontext()
        with PeakMemory(device) as peak, live:
            run()
        tracked[region] = (peak, live)
    (forward, forward_live), (blended, blended_live) = tracked["forward"], tracked["blended"]
    static = sum(weights.values()) + sum(constants.values()) + buffers + residuals
    if device.type == "cuda":
        activations, measured = forward.added, blended.allocated_peak
        what = "max_memory_allocated during the blended loop"
    else:
        activations, measured = forward_live.peak, static + blended_live.peak
        what = "weights + engine constants + buffers + peak live tensors created during the blended loop"
    bound = MemoryBound(sum(weights.values()), sum(constants.values()), buffers, activations, held_before, workspace,
                        residuals)
    return {"plan": plan.label, "weights_bytes": weights, "engine_constants_bytes": constants,
            "cache_residual_bytes": residuals,
            "large_activations_bytes": activations, "held_before_bytes": held_before,
            "stream_workspace_bytes": workspace,
            "shared_buffers_bytes": buffers, "bound_bytes": bound.total, "measured_bytes": measured,
            "measured": what, "met": measured <= bound.total,
            "rss": {"before_load_bytes": baseline_rss, "loaded_bytes": rss_loaded,
                    "first_large_forward_growth_bytes": forward.rss_peak - forward.rss_start,
                    "blended_peak_bytes": blended.rss_peak,
                    "process_growth_bytes": (blended.rss_peak - baseline_rss) if baseline_rss else None},
            "blended": blended.to_dict()}
