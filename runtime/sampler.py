"""The blended sampling loop: per step, pick the engine the plan names, guide, move the latents.

All setup happens before the loop: solver table, buffers, bindings, per-step engine list and
views. The loop body is a handful of in-place ops over those buffers and allocates nothing,
which is what lets runtime/graph.py capture it whole.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol, runtime_checkable

import torch

from flowblend.errors import FlowblendError

from ..engines.base import TIMESTEP, Engine
from ..engines.step_cache import CacheSchedule
from ..engines.streams import new_stream, use_stream
from .buffers import SamplerBuffers
from .fused import fused_steps_for
from .plan import BlendPlan
from .solvers import SOLVERS, SolverTable, make_solver_table
from .step import apply_combine, guide


@dataclass(frozen=True)
class SamplerOptions:
    """Everything besides engines and plan that fixes the numerics of a run: the one way to set them.

    A frozen config object passed whole (gpt-fast's `ModelArgs`, diffusers' `config`); change a
    field with `options.replace(guidance_scale=1.0)`.
    """

    solver: str = "unipc"
    shift: float = 3.0
    guidance_scale: float = 5.0
    mu: float | None = None  # dynamic shifting (LTX); replaces `shift` when given
    fused_kernel: bool = True  # on CUDA, runtime/fused.py's one-kernel step when the library is built
    # Per-step CFG scales (runtime/guidance.py: Wan 2.2's experts each bring theirs); None: guidance_scale
    # at every step. Read from a device tensor per step, so a captured loop reads it from memory.
    guidance_table: tuple[float, ...] | None = None
    # (timesteps, sigmas) as a checkpoint's own diffusers scheduler set them (its config may carry options the
    # solver name and shift do not, e.g. LTX's shift_terminal); None: computed from solver, shift and mu.
    schedule: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise FlowblendError(f"unknown solver {self.solver!r}: choose one of {', '.join(SOLVERS)}")
        if not self.guidance_scale >= 0:
            raise FlowblendError(f"guidance_scale must be >= 0 (1 disables CFG), got {self.guidance_scale}")
        if not self.shift > 0:
            raise FlowblendError(f"shift must be > 0 (Wan 480p uses 3.0, 720p 5.0), got {self.shift}")
        if self.guidance_table is not None:
            object.__setattr__(self, "guidance_table", tuple(float(g) for g in self.guidance_table))
            if not all(g >= 0 for g in self.guidance_table):
                raise FlowblendError(f"guidance_table has a negative or NaN scale: {self.guidance_table}")
        if self.schedule is not None:
            timesteps, sigmas = (tuple(float(x) for x in part) for part in self.schedule)
            if len(sigmas) != len(timesteps) + 1:
                raise FlowblendError(f"schedule is (timesteps, sigmas) with one sigma more than timesteps (the final "
                                     f"level), got {len(timesteps)} and {len(sigmas)}: runtime.solvers.schedule_of("
                                     "scheduler) after set_timesteps gives it")
            object.__setattr__(self, "schedule", (timesteps, sigmas))

    def guidance_for(self, steps: int) -> tuple[float, ...]:
        """The scale of every step (the table, or guidance_scale repeated)."""
        if self.guidance_table is None:
            return (float(self.guidance_scale),) * steps
        if len(self.guidance_table) != steps:
            raise FlowblendError(f"guidance_table has {len(self.guidance_table)} scales but the plan {steps} steps: "
                                 "give one scale per step (runtime/guidance.py's guidance_table)")
        return self.guidance_table

    def replace(self, **changes) -> "SamplerOptions":
        """A copy with `changes` applied (validated again)."""
        return replace(self, **changes)


@runtime_checkable
class LatentSampler(Protocol):
    """What a pipeline drives: `Sampler` (the eager loop) and `GraphRunner` (the loop in CUDA graphs)."""

    def sample(self, noise: torch.Tensor, prompt_embeds: torch.Tensor,
               negative_prompt_embeds: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
               negative_prompt_mask: torch.Tensor | None = None, progress: bool = False,
               on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """Denoise `noise` [1, C, F, H, W]; returns the final latents (float32, a copy).

        `on_step(i)` runs after step i, outside the step (progress, timing, cancellation: it may raise to
        stop the loop); where the steps run as one CUDA graph it runs once, after the last.
        """


class Sampler:
    """Runs a BlendPlan over two (or more) engines that share one set of buffers.

    `Sampler(engines={"large": TorchEngine(m14b), "small": TorchEngine(m1b)}, plan=plan,
    options=SamplerOptions(solver="unipc", shift=3.0, guidance_scale=5.0)).sample(noise, prompt_embeds,
    negative_prompt_embeds)`

    The numerics come from `options` alone; `device` and `dtype` (where the shared buffers live)
    default to the engines' own (`Engine.device`, `Engine.dtype`).
    """

    def __init__(self, engines: dict[str, Engine], plan: BlendPlan, options: SamplerOptions = SamplerOptions(), *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        if not isinstance(options, SamplerOptions):
            raise FlowblendError(f"options must be a SamplerOptions, got {type(options).__name__}: "
                                 "Sampler(engines, plan, SamplerOptions(solver=..., guidance_scale=...))")
        missing = sorted(set(plan.models) - set(engines))
        if missing:
            raise FlowblendError(f"plan {plan.label} uses {missing} but engines has only {sorted(engines)}: "
                                 "pass an engine for every model the plan names")
        self.options = options
        self.engines = engines
        self.plan = plan
        # one monotone schedule; stages with their own step counts place them in their intervals (plan.segments);
        # options.schedule: a checkpoint's own scheduler set it (the diffusers-style pipelines)
        self.table: SolverTable = make_solver_table(options.solver, len(plan), options.shift, options.mu,
                                                    segments=plan.segments, schedule=options.schedule)
        # CFG scale per step, a table like the solver's coefficients (runtime/step.py's g[i]; Wan 2.2's experts
        # each bring theirs, runtime/guidance.py); the buffers carry the unconditional row when any step guides
        self.guidance_scales: tuple[float, ...] = options.guidance_for(len(plan))
        self.cfg = any(g > 1.0 for g in self.guidance_scales)  # diffusers' rule: CFG only above 1
        # A model that never guides (a distilled one at guidance 1) runs batch 1 on the conditional rows of the
        # shared buffers, also in a plan whose other models guide: half the forward, no unconditional prompt
        # (models outside the plan keep the full batch: calibration runs them at the plan's steps and scales)
        unguided = set(plan.models) - {m for m, g in zip(plan.models, self.guidance_scales) if g > 1.0}
        self.rows = {m: 1 if not self.cfg or m in unguided else 2 for m in engines}
        self._step_rows = [self.rows[m] for m in plan.models]
        first = next(iter(engines.values()))
        self.device = torch.device(device) if device is not None else torch.device(first.device)
        self.dtype = dtype if dtype is not None else first.dtype
        self.needs_mask = any("text_mask" in e.input_names for e in engines.values())
        self._step_engines = [engines[m] for m in plan.models]
        self.cache_schedules = cache_schedules(engines, plan)
        self.buffers: SamplerBuffers | None = None
        self._shape_key = None
        self._fused = None
        self._stream = None  # the dedicated stream the loop runs on (engines/streams.py), made on first run

    # -- setup (once per shape) ---------------------------------------------------------------
    def prepare(self, latent_shape, text_shape) -> SamplerBuffers:
        """Allocate the shared buffers for a shape and bind every engine to them (no-op if unchanged)."""
        key = (tuple(latent_shape), tuple(text_shape))
        if key == self._shape_key:
            # Engines may be shared with another Sampler (other plan, same models) that bound them to
            # its own buffers since; binding is cheap (addresses only), so always take them back.
            self._bind_engines()
            return self.buffers
        bufs = SamplerBuffers.allocate(latent_shape, text_shape, self.table.timesteps, self.cfg,
                                       self.dtype, self.device, self.table.state_names, self.needs_mask,
                                       guidance=self.guidance_scales)
        full = bufs.engine_bindings()
        # the conditional rows as views made once (engines recognise a binding by its tensors)
        self._bindings = {2: full, 1: full if not bufs.cfg else {k: v[:, 0:1] if k == TIMESTEP else v[0:1]
                                                                for k, v in full.items()}}
        self.buffers, self._shape_key = bufs, key
        self._bind_engines()
        self._solver_tensors = bufs.solver_tensors()
        self._v_cond, self._v_uncond = bufs.velocity[0:1], bufs.velocity[-1:]
        self._step_ops = self.table.steps
        # g[i] as 0-d views of the buffers' guidance table: a captured loop reads each step's scale from memory
        self._guidance_rows = [bufs.guidance_table[i] for i in range(len(self.plan))]
        self._fused = fused_steps_for(bufs, self.table, self.guidance_scales, self._step_rows) \
            if self.options.fused_kernel else None
        return bufs

    def _bind_engines(self) -> None:
        for name, engine in self.engines.items():
            engine.bind(self._bindings[self.rows[name]])
            if hasattr(engine, "set_cache_schedule"):  # engines are shared: every sampler sets its own (maybe none)
                engine.set_cache_schedule(self.cache_schedules.get(name, CacheSchedule({})))

    def load_request(self, noise, prompt_embeds, negative_prompt_embeds=None, prompt_mask=None,
                     negative_prompt_mask=None) -> SamplerBuffers:
        """Copy one request's noise and text into the static buffers (the only per-request writes)."""
        if noise.dim() != 5 or noise.shape[0] != 1:
            hint = ": add the batch with noise[None]" if noise.dim() == 4 else ""
            raise FlowblendError(f"noise must be one video's latents with batch 1, [1, C, F, H, W]; got shape "
                                 f"{list(noise.shape)}{hint}")
        if prompt_embeds.dim() == 2:
            prompt_embeds = prompt_embeds[None]
        if prompt_embeds.shape[0] != 1:
            raise FlowblendError(f"prompt_embeds must be [1, L, D] (one prompt per call), "
                                 f"got {tuple(prompt_embeds.shape)}")
        if self.cfg and negative_prompt_embeds is None:
            raise FlowblendError(f"guidance_scale={max(self.guidance_scales)} > 1 needs negative_prompt_embeds "
                                 "(encode the negative prompt, \"\" by default), or set guidance_scale=1")
        if self.needs_mask and prompt_mask is None:
            raise FlowblendError("this model family takes a text mask: pass prompt_mask (and negative_prompt_mask)")
        bufs = self.prepare(noise.shape[1:], prompt_embeds.shape[1:])
        bufs.latents.copy_(noise)
        bufs.text_embeds[0:1].copy_(prompt_embeds)
        if self.cfg:
            neg = negative_prompt_embeds[None] if negative_prompt_embeds.dim() == 2 else negative_prompt_embeds
            if neg.shape[1:] != prompt_embeds.shape[1:]:
                raise FlowblendError(f"negative_prompt_embeds {tuple(neg.shape)} must match prompt_embeds "
                                     f"{tuple(prompt_embeds.shape)}: pad both to the same length")
            bufs.text_embeds[1:2].copy_(neg)
        if bufs.text_mask is not None:
            bufs.text_mask[0:1].copy_(prompt_mask.reshape(1, -1))
            if self.cfg:
                bufs.text_mask[1:2].copy_((negative_prompt_mask if negative_prompt_mask is not None
                                           else prompt_mask).reshape(1, -1))
        for tensor in bufs.state.values():
            tensor.zero_()
        self._prepare_model_input()
        return bufs

    def replace_sample(self, latents: torch.Tensor) -> None:
        """Between steps: make `latents` [1, C, F, H, W] the sample the next step starts from (a diffusers
        `callback_on_step_end` that returns new latents)."""
        self.buffers.latents.copy_(latents)
        self._prepare_model_input()

    # -- the loop -------------------------------------------------------------------------------
    def _prepare_model_input(self) -> None:
        bufs = self.buffers
        if bufs.model_input is not bufs.latents:
            bufs.model_input.copy_(bufs.latents)  # broadcasts over the CFG batch, casts to engine dtype

    def step(self, i: int) -> None:
        """One denoising step, the formulas of runtime/step.py: velocity, guidance, solver update."""
        if self._fused is not None:  # guidance, update and next input in one CUDA kernel (runtime/fused.py)
            self._step_engines[i].run(i)
            self._fused.step(i)  # writes the next input into this step's rows
            if i + 1 < len(self._step_rows) and self._step_rows[i] < self._step_rows[i + 1]:
                self.buffers.model_input[1:2].copy_(self.buffers.model_input[0:1])
            return
        self.evaluate(i)  # velocity = model(latents, t[i]); guided = uncond + g[i] * (cond - uncond)
        self.advance(i)  # latents = solver update (Euler: latents + (sigma[i+1] - sigma[i]) * guided)

    def evaluate(self, i: int, model: str | None = None) -> None:
        """First half of step i: run an engine and CFG-combine into `buffers.guided`, latents untouched.

        `model` runs another of `engines` on the same inputs instead of the plan's (calibration
        compares both models' velocities at one latent); the last evaluate before `advance` is the
        velocity the solver uses.
        """
        bufs = self.buffers
        engine = self._step_engines[i] if model is None else self.engines[model]
        engine.run(i)
        if (self._step_rows[i] if model is None else self.rows[model]) == 2:
            guide(self._v_cond, self._v_uncond, self._guidance_rows[i], out=bufs.guided)
        elif bufs.guided is not bufs.velocity:
            bufs.guided.copy_(self._v_cond)  # to float32 for the solver

    def advance(self, i: int) -> None:
        """Second half of step i: the solver's update of step i from `buffers.guided`, then the next model input."""
        for op in self._step_ops[i]:  # the table runtime/solvers.py derived from runtime/step.py's formulas
            apply_combine(op, self._solver_tensors)
        self._prepare_model_input()

    def run_loop(self, progress: bool = False, on_step: Callable[[int], None] | None = None) -> None:
        """All steps over the loaded request (what a whole-loop CUDA graph captures), on a dedicated stream.

        Never the legacy default stream: TensorRT adds device-wide syncs to enqueues there, which
        would slow the eager baseline (and inflate graph speedups). `on_step(i)`, if given, runs after
        step i, between steps and never inside one (progress, timing, cancellation: it may raise to
        stop the loop); it is not part of what a graph captures.
        """
        if self._stream is None:
            self._stream = new_stream(self.device)
        with use_stream(self._stream, self.device):
            if on_step is not None:
                for i in range(len(self.plan)):
                    self.step(i)
                    on_step(i)
                return
            if not progress:
                for i in range(len(self.plan)):
                    self.step(i)
                return
            from tqdm.auto import tqdm
            with tqdm(total=len(self.plan), desc="denoising", unit="step") as bar:
                for i, model in enumerate(self.plan.models):
                    bar.set_postfix_str(f"{model}")
                    self.step(i)
                    bar.update()

    @torch.no_grad()
    def sample(self, noise, prompt_embeds, negative_prompt_embeds=None, prompt_mask=None,
               negative_prompt_mask=None, progress: bool = False,
               on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """Denoise `noise` [1, C, F, H, W] under the plan; returns the final latents (float32, a copy)."""
        self.load_request(noise, prompt_embeds, negative_prompt_embeds, prompt_mask, negative_prompt_mask)
        self.run_loop(progress, on_step)
        return self.buffers.latents.clone()


def cache_schedules(engines: dict[str, Engine], plan: BlendPlan) -> dict[str, CacheSchedule]:
    """Per model with cached steps in the plan, its store/reuse schedule (engines/step_cache.py); refused in one line
    where that model's engine runs the whole forward (ONNX Runtime, TensorRT, a module without the step split)."""
    out = {}
    for name in dict.fromkeys(m for i, m in enumerate(plan.models) if plan.is_cached(i)):
        engine = engines[name]
        if not getattr(engine, "supports_step_cache", False):
            raise FlowblendError(f"plan {plan.label} caches steps of {name}, whose engine ({type(engine).__name__}) "
                                 "runs the whole forward and cannot skip its blocks: run it on a PyTorch engine "
                                 "(--backend torch) or spell the plan in capitals (no cached steps)")
        out[name] = CacheSchedule.for_model(plan.models, plan.cached, name)
    return out
