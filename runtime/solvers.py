"""Flow-matching solvers as per-step coefficient tables, precomputed on the host.

Every Euler or UniPC step is a linear combination of the current sample, the guided velocity and
a short history of data predictions, with coefficients that depend only on the sigma schedule.
Computing them once per (solver, steps, shift) turns each step into a fixed sequence of in-place
tensor ops: nothing to allocate, nothing to branch on, so the whole loop can be captured in one
CUDA graph. The sigma schedule itself comes from diffusers' schedulers (the reference), and the
coefficients follow their arithmetic (float32, same formulas) so the tables match them step by
step; tests/test_solvers.py checks that against the schedulers themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SOLVERS = ("euler", "unipc")
UNIPC_HISTORY = 3  # data predictions kept: this step's, the previous and the one before


@dataclass(frozen=True)
class Combine:
    """`target <- sum(coef * source)` over named buffers; a target may appear among its sources."""

    target: str
    terms: tuple[tuple[str, float], ...]


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
                      scheduler=None) -> SolverTable:
    """Coefficient table for `steps` steps of `solver`; pass `scheduler` to follow a checkpoint's own config."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
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
        cfg = scheduler.config
        if (cfg.solver_order, cfg.solver_type, cfg.predict_x0, cfg.prediction_type) != (2, "bh2", True, "flow_prediction") \
                or not cfg.lower_order_final or list(cfg.disable_corrector):
            raise ValueError("the UniPC table supports Wan's options only: solver_order=2, solver_type='bh2', "
                             "predict_x0=True, prediction_type='flow_prediction', lower_order_final=True")
        return _unipc_table(sigmas, timesteps)
    raise ValueError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")


def _euler_table(sigmas: torch.Tensor, timesteps: tuple[float, ...]) -> SolverTable:
    steps = tuple(
        (Combine("latents", (("latents", 1.0), ("velocity", float(sigmas[i + 1] - sigmas[i])))),)
        for i in range(len(timesteps)))
    return SolverTable("euler", timesteps, tuple(float(s) for s in sigmas), (), steps)


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    # flow sigmas: alpha = 1 - sigma; log(0) = -inf at the final level is what diffusers relies on too
    return torch.log(1 - sigma) - torch.log(sigma)


def _phi_terms(sigma_t: torch.Tensor, sigma_s0: torch.Tensor):
    h = _lambda(sigma_t) - _lambda(sigma_s0)
    hh = -h
    h_phi_1 = torch.expm1(hh)
    return h, hh, h_phi_1, torch.expm1(hh)  # B_h for bh2


def _unipc_table(sigmas: torch.Tensor, timesteps: tuple[float, ...]) -> SolverTable:
    n = len(timesteps)
    slot = lambda i: f"x0_{i % UNIPC_HISTORY}"  # noqa: E731 - ring of data predictions
    orders = [min(2, n - i, i + 1) for i in range(n)]
    steps = []
    for i in range(n):
        ops = [Combine(slot(i), (("latents", 1.0), ("velocity", -float(sigmas[i]))))]
        if i > 0:
            ops.append(_unipc_corrector(sigmas, i, orders[i - 1], slot))
        ops.append(Combine("last_sample", (("latents", 1.0),)))
        ops.append(_unipc_predictor(sigmas, i, orders[i], slot))
        steps.append(tuple(ops))
    state = ("last_sample",) + tuple(f"x0_{k}" for k in range(UNIPC_HISTORY))
    return SolverTable("unipc", timesteps, tuple(float(s) for s in sigmas), state, tuple(steps))


def _unipc_predictor(sigmas, i, order, slot) -> Combine:
    """UniP-bh2 from sigmas[i] to sigmas[i+1], as diffusers' multistep_uni_p_bh_update."""
    sigma_t, sigma_s0 = sigmas[i + 1], sigmas[i]
    alpha_t = 1 - sigma_t
    h, hh, h_phi_1, b_h = _phi_terms(sigma_t, sigma_s0)
    coef_m0 = -alpha_t * h_phi_1
    terms = [("latents", float(sigma_t / sigma_s0))]
    if order == 2:
        rk = (_lambda(sigmas[i - 1]) - _lambda(sigma_s0)) / h
        # pred_res = 0.5 * (m1 - m0) / rk, scaled by -alpha_t * B_h
        k = alpha_t * b_h * 0.5 / rk
        terms += [(slot(i), float(coef_m0 + k)), (slot(i - 1), float(-k))]
    else:
        terms += [(slot(i), float(coef_m0))]
    return Combine("latents", tuple(terms))


def _unipc_corrector(sigmas, i, order, slot) -> Combine:
    """UniC-bh2 correcting the sample at step i, as diffusers' multistep_uni_c_bh_update."""
    sigma_t, sigma_s0 = sigmas[i], sigmas[i - 1]
    alpha_t = 1 - sigma_t
    h, hh, h_phi_1, b_h = _phi_terms(sigma_t, sigma_s0)
    if order == 1:
        rho_last, rho_hist, rk = torch.tensor(0.5), None, None
    else:
        rk = (_lambda(sigmas[i - 2]) - _lambda(sigma_s0)) / h
        rks = torch.stack([rk, torch.ones(())])
        h_phi_k = h_phi_1 / hh - 1
        factorial = 1
        rows, b = [], []
        for p in range(1, order + 1):
            rows.append(torch.pow(rks, p - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= p + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        rhos = torch.linalg.solve(torch.stack(rows), torch.stack(b))
        rho_hist, rho_last = rhos[0], rhos[1]
    scale = alpha_t * b_h
    coef_m0 = -alpha_t * h_phi_1 + scale * rho_last  # from D1_t = model_t - m0
    terms = [("last_sample", float(sigma_t / sigma_s0)), (slot(i), float(-scale * rho_last))]
    if rho_hist is not None:
        k = scale * rho_hist / rk  # corr_res = rho_hist * (m_{i-2} - m0) / rk
        coef_m0 = coef_m0 + k
        terms.append((slot(i - 2), float(-k)))
    terms.append((slot(i - 1), float(coef_m0)))
    return Combine("latents", tuple(terms))


def apply_combine(op: Combine, tensors: dict[str, torch.Tensor]) -> None:
    """Run one Combine in place: no tensor is allocated (mul with out=, then add_)."""
    target = tensors[op.target]
    terms = op.terms
    own = [c for name, c in terms if name == op.target]
    if own:
        if own[0] != 1.0:
            target.mul_(own[0])
        rest = [(n, c) for n, c in terms if n != op.target]
    else:
        first_name, first_coef = terms[0]
        if first_coef == 1.0:
            target.copy_(tensors[first_name])
        else:
            torch.mul(tensors[first_name], first_coef, out=target)
        rest = terms[1:]
    for name, coef in rest:
        target.add_(tensors[name], alpha=coef)
