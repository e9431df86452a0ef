"""Flow-matching solvers as per-step coefficient tables, precomputed on the host.

Every Euler or UniPC step is a linear combination of the current sample, the guided velocity and
a short history of data predictions, with coefficients that depend only on the sigma schedule.
The formulas are written once in runtime/step.py; evaluating them here on symbolic buffers once per
(solver, steps, shift) turns each step into a fixed sequence of in-place tensor ops: nothing to
allocate, nothing to branch on, so the whole loop can be captured in one CUDA graph. The sigma
schedule itself comes from diffusers' schedulers (the reference), and the scalars are computed in
their arithmetic (float32 tensors), so the tables match them step by step; tests/test_solvers.py
checks that against the schedulers themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .step import Combine, Lin, euler_update, flow_data_prediction, unipc_corrector, unipc_predictor

SOLVERS = ("euler", "unipc")
UNIPC_HISTORY = 3  # data predictions kept: this step's, the previous and the one before


@dataclass(frozen=True)
class SolverTable:
    """Everything a sampler needs to move latents: model timesteps and per-step ops."""

    name: str
    timesteps: tuple[float, ...]  # the model's timestep input at each step
    sigmas: tuple[float, ...]  # n + 1 noise levels, the last one the final level (0)
    state_names: tuple[str, ...]  # solver-private buffers, each shaped like the latents
    steps: tuple[tuple[Combine, ...], ...]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def scheduler_for(solver: str, shift: float = 1.0, use_dynamic_shifting: bool = False, **config):
    """The diffusers scheduler whose schedule a solver table reproduces (Wan's UniPC options)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if solver == "unipc":
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
            num_train_timesteps=1000, solver_order=2, solver_type="bh2", predict_x0=True,
            lower_order_final=True, final_sigmas_type="zero",
            use_dynamic_shifting=use_dynamic_shifting, **config)
    if solver == "euler":
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=shift, use_dynamic_shifting=use_dynamic_shifting, **config)
    raise ValueError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")


def make_solver_table(solver: str, steps: int, shift: float = 1.0, mu: float | None = None,
                      scheduler=None, schedule: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> SolverTable:
    """Coefficient table for `steps` steps of `solver`; pass `scheduler` to follow a checkpoint's own config, or
    `schedule` = (timesteps, sigmas) as such a scheduler's `set_timesteps` left them (`schedule_of`)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule is not None:
        timesteps, sigmas = schedule
        if len(timesteps) != steps or len(sigmas) != steps + 1:
            raise ValueError(f"schedule has {len(timesteps)} timesteps and {len(sigmas)} sigmas; {steps} steps need "
                             f"{steps} and {steps + 1}")
        table = {"euler": _euler_table, "unipc": _unipc_table}.get(solver)
        if table is None:
            raise ValueError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
        return table(torch.tensor(sigmas, dtype=torch.float32), tuple(float(t) for t in timesteps))
    if scheduler is None:
        scheduler = scheduler_for(solver, shift, use_dynamic_shifting=mu is not None)
    kwargs = {} if mu is None else {"mu": mu}
    if solver == "euler" and mu is not None:
        import numpy as np
        kwargs["sigmas"] = np.linspace(1.0, 1.0 / steps, steps)  # what LTX's pipeline passes
    scheduler.set_timesteps(steps, **kwargs)
    sigmas = scheduler.sigmas.to(torch.float32)
    timesteps = tuple(float(t) for t in scheduler.timesteps)
    if solver == "euler":
        return _euler_table(sigmas, timesteps)
    if solver == "unipc":
        check_unipc_config(scheduler.config)
        return _unipc_table(sigmas, timesteps)
    raise ValueError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")


def check_unipc_config(cfg) -> None:
    """The UniPC options the table reproduces (Wan's); ValueError naming them for any other config."""
    if (cfg.solver_order, cfg.solver_type, cfg.predict_x0, cfg.prediction_type) != (2, "bh2", True, "flow_prediction") \
            or not cfg.lower_order_final or list(cfg.disable_corrector):
        raise ValueError("the UniPC table supports Wan's options only: solver_order=2, solver_type='bh2', "
                         "predict_x0=True, prediction_type='flow_prediction', lower_order_final=True")


def schedule_of(scheduler) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(timesteps, sigmas) of a diffusers scheduler after `set_timesteps`, as SamplerOptions.schedule takes them."""
    return (tuple(float(t) for t in scheduler.timesteps),
            tuple(float(s) for s in scheduler.sigmas.to(torch.float32)))


def _euler_table(sigmas: torch.Tensor, timesteps: tuple[float, ...]) -> SolverTable:
    latents, velocity = Lin.of("latents"), Lin.of("velocity")
    steps = tuple((Combine.of("latents", euler_update(latents, velocity, sigmas[i], sigmas[i + 1])),)
                  for i in range(len(timesteps)))
    return SolverTable("euler", timesteps, tuple(float(s) for s in sigmas), (), steps)


def _unipc_table(sigmas: torch.Tensor, timesteps: tuple[float, ...]) -> SolverTable:
    """Wan's UniPC (order 2, bh2, lower order at the first and last step) as diffusers' step() runs it."""
    n = len(timesteps)
    latents, velocity, last_sample = Lin.of("latents"), Lin.of("velocity"), Lin.of("last_sample")
    slot = lambda i: f"x0_{i % UNIPC_HISTORY}"  # noqa: E731 - ring of data predictions
    x0 = lambda i: Lin.of(slot(i))  # noqa: E731
    orders = [min(2, n - i, i + 1) for i in range(n)]  # lower_order_final, and one history at the start
    steps = []
    for i in range(n):
        ops = [Combine.of(slot(i), flow_data_prediction(latents, velocity, sigmas[i]))]
        if i > 0:  # UniC corrects the last prediction now that the model has seen sigma[i], at that predictor's order
            m1, s1 = (x0(i - 2), sigmas[i - 2]) if orders[i - 1] == 2 else (None, None)
            ops.append(Combine.of("latents", unipc_corrector(last_sample, x0(i), x0(i - 1), m1, sigmas[i],
                                                             sigmas[i - 1], s1)))
        ops.append(Combine.of("last_sample", latents))
        m1, s1 = (x0(i - 1), sigmas[i - 1]) if orders[i] == 2 else (None, None)
        ops.append(Combine.of("latents", unipc_predictor(latents, x0(i), m1, sigmas[i + 1], sigmas[i], s1)))
        steps.append(tuple(ops))
    state = ("last_sample",) + tuple(f"x0_{k}" for k in range(UNIPC_HISTORY))
    return SolverTable("unipc", timesteps, tuple(float(s) for s in sigmas), state, tuple(steps))
