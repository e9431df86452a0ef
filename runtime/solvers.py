"""Flow-matching solvers as per-step coefficient tables, precomputed on the host.

Every Euler, UniPC or DPM-Solver++ step is a linear combination of the current sample, the guided
velocity and a short history of data predictions, with coefficients that depend only on the sigma
schedule.
The formulas are written once in runtime/step.py; evaluating them here on symbolic buffers once per
(solver, steps, shift) turns each step into a fixed sequence of in-place tensor ops: nothing to
allocate, nothing to branch on, so the whole loop can be captured in one CUDA graph. The sigma
schedule itself comes from diffusers' schedulers (the reference), and the scalars are computed in
their arithmetic (float32 tensors), so the tables match them step by step; tests/test_solvers.py
checks that against the schedulers themselves.

A plan may give its stages their own step counts over their sigma intervals (`L20,D4/20,L10`:
`segments`, runtime/plan.py). The run is still one monotone sigma sequence, with one solver whose
history runs across every stage boundary: the base schedule of sum(spans) steps fixes the
boundaries, and each stage places its own k steps uniformly in the scheduler's unshifted
coordinate u across its interval, then the solver's own shift maps u to sigma (`stage_inputs`).
That is how diffusers' schedulers space any run (uniform in u, then `flow_shift` or LTX's
`time_shift(mu)`; LTXPipeline passes `sigmas=linspace(1, 1/n, n)` for every checkpoint, distilled
or not, unless the caller gives its own list): so a stage of k steps over a span of s base steps
samples its interval at the density of a (k * N / s)-step run, and a stage with k = s reproduces
the base schedule. The distilled LTX checkpoints' own lists (diffusers' LTX docs pass
`timesteps=[1000, 993, 987, 981, 975, 909, 725, 0.03]` with guidance_scale=1.0 for a whole run, and
for the refinement pass trim `[1000, 909, 725, 421, 0]` with `denoise_strength`) cover the whole
range, so a middle interval has no list of its own: it takes the rule above.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .step import Combine, Lin, dpmpp_update, euler_update, flow_data_prediction, unipc_corrector, unipc_predictor

# dpm++ is DPM-Solver++ 2M (diffusers' DPMSolverMultistepScheduler, solver_order=2), dpm++3m its order 3
SOLVERS = ("euler", "unipc", "dpm++", "dpm++3m")
DPMPP_ORDER = {"dpm++": 2, "dpm++3m": 3}
UNIPC_HISTORY = 3  # data predictions kept: this step's, the previous and the one before
NUM_TRAIN_TIMESTEPS = 1000


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
    if solver in DPMPP_ORDER:
        from diffusers import DPMSolverMultistepScheduler

        options = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                       num_train_timesteps=1000, solver_order=DPMPP_ORDER[solver], algorithm_type="dpmsolver++",
                       solver_type="midpoint", lower_order_final=True, euler_at_final=False,
                       final_sigmas_type="zero", use_dynamic_shifting=use_dynamic_shifting)
        return DPMSolverMultistepScheduler(**{**options, **config})
    raise ValueError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")


def make_solver_table(solver: str, steps: int, shift: float = 1.0, mu: float | None = None,
                      scheduler=None, segments: tuple[tuple[int, int], ...] = (),
                      schedule: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> SolverTable:
    """Coefficient table for `steps` steps of `solver`; pass `scheduler` to follow a checkpoint's own config, or
    `schedule` = (timesteps, sigmas) as such a scheduler's `set_timesteps` left them (`schedule_of`).

    `segments` ((steps, span) per stage, runtime/plan.py's BlendPlan.segments) gives stages their own step
    counts over the intervals of a sum(spans)-step base schedule; () is the plain `steps`-step schedule.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if schedule is not None:
        if any(k != span for k, span in segments):
            raise ValueError(f"a plan whose stages take their own step counts ({segments}) places them on the "
                             "solver's own schedule, not on a given (timesteps, sigmas) schedule: give one or the other")
        return _table_of_schedule(solver, steps, schedule)
    if scheduler is None:
        scheduler = scheduler_for(solver, shift, use_dynamic_shifting=mu is not None)
    if segments and any(k != span for k, span in segments):
        if sum(k for k, _ in segments) != steps:
            raise ValueError(f"segments {segments} have {sum(k for k, _ in segments)} steps, not {steps}")
        set_stage_timesteps(scheduler, solver, stage_inputs(solver, scheduler, segments, mu), mu)
    else:
        kwargs = {} if mu is None else {"mu": mu}
        if solver == "euler" and mu is not None:
            import numpy as np
            kwargs["sigmas"] = np.linspace(1.0, 1.0 / steps, steps)  # what LTX's pipeline passes
        scheduler.set_timesteps(steps, **kwargs)
    sigmas = scheduler.sigmas.to(torch.float32)
    timesteps = tuple(float(t) for t in scheduler.timesteps)
    cfg = scheduler.config
    if solver == "euler":
        return _euler_table(sigmas, timesteps)
    if solver == "unipc":
        check_unipc_config(cfg)
        return _unipc_table(sigmas, timesteps)
    check_dpmpp_config(cfg)
    return _dpmpp_table(sigmas, timesteps, cfg.solver_order, solver)


# -- per-stage step counts: one monotone schedule ------------------------------------------------
def base_inputs(solver: str, scheduler, steps: int, mu: float | None = None):
    """The unshifted coordinate u of a `steps`-step run of `solver` at its n + 1 points (u[n] = 0): what the
    scheduler's set_timesteps computes before its shift (float64, as diffusers' numpy code)."""
    import numpy as np

    T = NUM_TRAIN_TIMESTEPS
    if solver == "unipc":
        u = np.linspace(1, 1 / T, steps + 1)[:-1]
    elif solver in DPMPP_ORDER:
        u = np.flip(1.0 - np.linspace(1, 1 / T, steps + 1))[:-1]
    elif mu is not None:  # euler as LTXPipeline calls it
        u = np.linspace(1.0, 1.0 / steps, steps)
    else:  # FlowMatchEulerDiscreteScheduler's own default
        u = np.linspace(scheduler._sigma_to_t(scheduler.sigma_max), scheduler._sigma_to_t(scheduler.sigma_min),
                        steps) / T
    return np.concatenate([np.asarray(u, dtype=np.float64), [0.0]])


def stage_inputs(solver: str, scheduler, segments: tuple[tuple[int, int], ...], mu: float | None = None):
    """u at every step of a plan whose stages take `k` steps over `span` base steps: stage j starts at base point
    a = sum(spans before j) and its steps sit at base positions a + i * span / k, where u is the base run's own
    (linear between its points, so a whole position is exactly the base run's step and a stage with k = span
    is the base run's stretch)."""
    import numpy as np

    base = base_inputs(solver, scheduler, sum(span for _, span in segments), mu)
    positions, start = [], 0
    for k, span in segments:
        if k < 1 or span < 1:
            raise ValueError(f"a stage needs >= 1 step over >= 1 base step, got {k} over {span}")
        positions.append(start + np.arange(k) * (span / k))
        start += span
    return np.interp(np.concatenate(positions), np.arange(len(base)), base)


def set_stage_timesteps(scheduler, solver: str, u, mu: float | None = None) -> None:
    """Put the schedule with unshifted points `u` (one per step) into `scheduler`, through its own set_timesteps where
    it takes custom sigmas (FlowMatchEuler, UniPC); DPMSolverMultistepScheduler takes none with flow sigmas, so its
    set_timesteps' flow-sigma lines are repeated here on `u`."""
    import numpy as np

    kwargs = {} if mu is None else {"mu": mu}
    if solver in ("euler", "unipc"):
        scheduler.set_timesteps(len(u), sigmas=np.asarray(u), **kwargs)
        return
    scheduler.set_timesteps(len(u), **kwargs)  # resets the solver's state; flow_shift = exp(mu) when given
    shift = scheduler.config.flow_shift
    sigmas = shift * u / (1 + (shift - 1) * u)
    timesteps = (sigmas * scheduler.config.num_train_timesteps).copy()
    scheduler.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    scheduler.timesteps = torch.from_numpy(timesteps).to(dtype=torch.int64)
    scheduler.num_inference_steps = len(timesteps)


def check_unipc_config(cfg) -> None:
    """The UniPC options the table reproduces (Wan's); ValueError naming them for any other config."""
    if (cfg.solver_order, cfg.solver_type, cfg.predict_x0, cfg.prediction_type) != (2, "bh2", True, "flow_prediction") \
            or not cfg.lower_order_final or list(cfg.disable_corrector):
        raise ValueError("the UniPC table supports Wan's options only: solver_order=2, solver_type='bh2', "
                         "predict_x0=True, prediction_type='flow_prediction', lower_order_final=True")


def check_dpmpp_config(cfg) -> None:
    """The DPMSolverMultistepScheduler options the DPM++ table reproduces; ValueError naming them for any other."""
    if (cfg.algorithm_type, cfg.solver_type, cfg.prediction_type, cfg.final_sigmas_type, cfg.euler_at_final,
            cfg.lower_order_final, cfg.thresholding) != ("dpmsolver++", "midpoint", "flow_prediction", "zero", False,
                                                         True, False) or not cfg.use_flow_sigmas \
            or cfg.solver_order not in DPMPP_ORDER.values():
        raise ValueError("the DPM++ table supports algorithm_type='dpmsolver++', solver_type='midpoint', "
                         "prediction_type='flow_prediction', use_flow_sigmas=True, final_sigmas_type='zero', "
                         "lower_order_final=True, no thresholding, solver_order 2 or 3")


def dpmpp_solver_of_order(order: int) -> str:
    """The solver name of a DPM++ order (2: dpm++, 3: dpm++3m)."""
    return next(name for name, k in DPMPP_ORDER.items() if k == order)


def _table_of_schedule(solver: str, steps: int, schedule) -> SolverTable:
    """The table of a (timesteps, sigmas) schedule a checkpoint's scheduler set (its options checked by the caller)."""
    timesteps, sigmas = schedule
    if len(timesteps) != steps or len(sigmas) != steps + 1:
        raise ValueError(f"schedule has {len(timesteps)} timesteps and {len(sigmas)} sigmas; {steps} steps need "
                         f"{steps} and {steps + 1}")
    sigmas, timesteps = torch.tensor(sigmas, dtype=torch.float32), tuple(float(t) for t in timesteps)
    if solver == "euler":
        return _euler_table(sigmas, timesteps)
    if solver == "unipc":
        return _unipc_table(sigmas, timesteps)
    return _dpmpp_table(sigmas, timesteps, DPMPP_ORDER[solver], solver)


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


def _dpmpp_orders(n: int, order: int) -> list[int]:
    """The order DPMSolverMultistepScheduler.step uses at each of n steps: one history at the start, first order at
    the last step (final_sigmas_type='zero'), at most second order at the one before when n < 15."""
    orders = []
    for i in range(n):
        k = min(order, i + 1)
        if i == n - 1:
            k = 1
        elif i == n - 2 and n < 15:
            k = min(k, 2)
        orders.append(k)
    return orders


def _dpmpp_table(sigmas: torch.Tensor, timesteps: tuple[float, ...], order: int, name: str) -> SolverTable:
    """DPM-Solver++ (multistep, midpoint, flow prediction) as diffusers' step() runs it: x0 predictions in a ring."""
    n = len(timesteps)
    latents, velocity = Lin.of("latents"), Lin.of("velocity")
    slot = lambda i: f"x0_{i % order}"  # noqa: E731 - ring of the last `order` data predictions
    steps = []
    for i, k in enumerate(_dpmpp_orders(n, order)):
        history = [Lin.of(slot(i - j)) for j in range(k)]
        ops = (Combine.of(slot(i), flow_data_prediction(latents, velocity, sigmas[i])),
               Combine.of("latents", dpmpp_update(latents, history, sigmas[i + 1], [sigmas[i - j] for j in range(k)])))
        steps.append(ops)
    state = tuple(f"x0_{k}" for k in range(order))
    return SolverTable(name, timesteps, tuple(float(s) for s in sigmas), state, tuple(steps))
