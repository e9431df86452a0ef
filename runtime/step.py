"""The denoising step's math, written once: classifier-free guidance, Euler, UniPC and DPM-Solver++.

One step of the blended loop (runtime/sampler.py `Sampler.step`), with sigma[i] the noise level of
step i (sigma[n] = 0) and g[i] its guidance scale:

    velocity = model(latents, t[i], text)                     engine of plan.models[i], [cond; uncond]
    guided   = uncond + g[i] * (cond - uncond)                guide()
    Euler:     latents = latents + (sigma[i+1] - sigma[i]) * guided                     euler_update()
    UniPC:     x0[i]   = latents - sigma[i] * guided                              flow_data_prediction()
               latents = UniC(last_sample; x0[i], x0[i-1], x0[i-2])   if i > 0   unipc_corrector()
               last_sample = latents
               latents = UniP(latents; x0[i], x0[i-1])                            unipc_predictor()
    DPM++:     x0[i]   = latents - sigma[i] * guided                              flow_data_prediction()
               latents = DPM++ (order k): latents, x0[i], ..., x0[i-k+1]        dpmpp_update()

The solver formulas are plain arithmetic, so they run on tensors and also on `Lin`, a linear
combination of named buffers. runtime/solvers.py evaluates them on `Lin` once per schedule: what
comes out are the per-step coefficient tables (`Combine`s) that `apply_combine` applies in place,
without allocating or branching, so the loop can be captured in a CUDA graph (and runtime/fused.py
packs the same tables into one kernel). The tables are these formulas' derivation, not a second copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


# -- classifier-free guidance -------------------------------------------------------------------
def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor, out: torch.Tensor) -> None:
    """`out = uncond + scale * (cond - uncond)` in place, as diffusers' pipelines (noise_pred_uncond +
    guidance_scale * (noise_pred_text - noise_pred_uncond)); `out` may not alias cond or uncond. `scale` may
    be a 0-d tensor (the sampler's per-step guidance table row), read on the device without a host sync."""
    torch.sub(cond, uncond, out=out)
    out.mul_(scale).add_(uncond)


# -- solver formulas (over tensors or Lin) ------------------------------------------------------
def euler_update(latents, velocity, sigma, sigma_next):
    """Flow-matching Euler, as diffusers' FlowMatchEulerDiscreteScheduler.step (and flux's `denoise`):
    prev_sample = sample + (sigma_next - sigma) * model_output."""
    return latents + (sigma_next - sigma) * velocity


def flow_data_prediction(latents, velocity, sigma):
    """The data (x0) a flow velocity predicts, as UniPCMultistepScheduler.convert_model_output for
    prediction_type='flow_prediction': x0_pred = sample - sigma_t * model_output."""
    return latents - sigma * velocity


def flow_lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Log-SNR of a flow noise level: alpha = 1 - sigma, lambda = log(alpha) - log(sigma); +inf at sigma = 0,
    which the formulas below rely on at the last step, as diffusers does."""
    return torch.log(1 - sigma) - torch.log(sigma)


def unipc_predictor(x, m0, m1, sigma_t, sigma_s0, sigma_s1=None):
    """UniP-bh2 from sigma_s0 to sigma_t: diffusers' UniPCMultistepScheduler.multistep_uni_p_bh_update with
    predict_x0, flow sigmas and solver_order=2. m0 is the data prediction at sigma_s0; m1 the one at
    sigma_s1 (the step before) for order 2, None for order 1."""
    alpha_t = 1 - sigma_t
    h = flow_lambda(sigma_t) - flow_lambda(sigma_s0)
    h_phi_1 = torch.expm1(-h)  # hh = -h for predict_x0
    b_h = torch.expm1(-h)  # B(h) of bh2
    x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    if m1 is None:
        return x_t_
    rk = (flow_lambda(sigma_s1) - flow_lambda(sigma_s0)) / h
    d1 = (m1 - m0) / rk
    pred_res = 0.5 * d1  # rhos_p = [0.5] at order 2
    return x_t_ - alpha_t * b_h * pred_res


def unipc_corrector(last_sample, model_t, m0, m1, sigma_t, sigma_s0, sigma_s1=None):
    """UniC-bh2 at sigma_t: diffusers' UniPCMultistepScheduler.multistep_uni_c_bh_update with predict_x0 and
    flow sigmas. It recomputes the step sigma_s0 -> sigma_t from `last_sample` (the sample before that
    predictor) once the model has seen sigma_t: model_t is the data prediction at sigma_t, m0 at
    sigma_s0, m1 at sigma_s1 (order 2) or None (order 1)."""
    alpha_t = 1 - sigma_t
    h = flow_lambda(sigma_t) - flow_lambda(sigma_s0)
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)
    rk = None if m1 is None else (flow_lambda(sigma_s1) - flow_lambda(sigma_s0)) / h
    rhos_c = _unipc_rhos(hh, h_phi_1, b_h, rk)
    x_t_ = sigma_t / sigma_s0 * last_sample - alpha_t * h_phi_1 * m0
    corr_res = 0 if m1 is None else rhos_c[0] * ((m1 - m0) / rk)
    d1_t = model_t - m0
    return x_t_ - alpha_t * b_h * (corr_res + rhos_c[-1] * d1_t)


def dpmpp_update(x, history, sigma_t, sigmas_s):
    """DPM-Solver++ (multistep, midpoint) from sigmas_s[0] to sigma_t, as diffusers'
    DPMSolverMultistepScheduler with algorithm_type='dpmsolver++' and flow sigmas (alpha = 1 - sigma):
    dpm_solver_first_order_update, multistep_dpm_solver_second_order_update and
    multistep_dpm_solver_third_order_update for len(history) = 1, 2, 3. history[k] is the data
    prediction at sigmas_s[k], newest first. At sigma_t = 0 (the last step, first order) lambda_t is
    +inf and the step returns history[0], as diffusers does."""
    order = len(history)
    alpha_t = 1 - sigma_t
    lam_t, lam_s0 = flow_lambda(sigma_t), flow_lambda(sigmas_s[0])
    h = lam_t - lam_s0
    phi = torch.exp(-h) - 1.0
    x_t = (sigma_t / sigmas_s[0]) * x - (alpha_t * phi) * history[0]
    if order == 1:
        return x_t
    m0, m1 = history[0], history[1]
    r0 = (lam_s0 - flow_lambda(sigmas_s[1])) / h
    if order == 2:
        d1 = (1.0 / r0) * (m0 - m1)
        return x_t - 0.5 * (alpha_t * phi) * d1
    m2 = history[2]
    r1 = (flow_lambda(sigmas_s[1]) - flow_lambda(sigmas_s[2])) / h
    d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    return x_t + (alpha_t * (phi / h + 1.0)) * d1 - (alpha_t * ((phi + h) / h ** 2 - 0.5)) * d2


def _unipc_rhos(hh, h_phi_1, b_h, rk):
    """UniC's weights: [0.5] at order 1, else the solution of diffusers' R rhos = b."""
    if rk is None:
        return [torch.tensor(0.5)]
    rks = torch.stack([rk, torch.ones(())])
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    rows, b = [], []
    for p in range(1, 3):
        rows.append(torch.pow(rks, p - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= p + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return list(torch.linalg.solve(torch.stack(rows), torch.stack(b)))


# -- the formulas as tables: linear combinations of named buffers --------------------------------
class Lin:
    """`sum(coef * buffer)` over named buffers: the solver formulas above, evaluated on these with the
    schedule's sigmas, give each update's coefficients (the only arithmetic they do is linear)."""

    def __init__(self, terms: dict):
        self.terms = terms

    @classmethod
    def of(cls, name: str) -> "Lin":
        return cls({name: 1.0})

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:  # an absent history term (`corr_res = 0`)
            return self
        terms = dict(self.terms)
        for name, coef in other.terms.items():
            terms[name] = terms[name] + coef if name in terms else coef
        return Lin(terms)

    __radd__ = __add__

    def __mul__(self, scalar):
        return Lin({name: coef * scalar for name, coef in self.terms.items()})

    __rmul__ = __mul__

    def __neg__(self):
        return -1.0 * self

    def __sub__(self, other):
        return self + (-other)

    def __truediv__(self, scalar):
        return Lin({name: coef / scalar for name, coef in self.terms.items()})


@dataclass(frozen=True)
class Combine:
    """`target <- sum(coef * source)` over named buffers; a target may appear among its sources."""

    target: str
    terms: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, target: str, value: Lin) -> "Combine":
        """The update `target <- value`, with value's coefficients as host floats."""
        return cls(target, tuple((name, float(coef)) for name, coef in value.terms.items()))


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
