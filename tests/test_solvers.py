"""Solver tables against diffusers' schedulers, step by step (the reference)."""
import pytest
import torch

from flowblend.runtime.solvers import apply_combine, make_solver_table, scheduler_for

SHAPE = (1, 4, 3, 6, 5)


def _run_table(table, x, velocities):
    tensors = {"latents": x.clone()}
    for name in table.state_names:
        tensors[name] = torch.zeros_like(x)
    out = []
    for i, ops in enumerate(table.steps):
        tensors["velocity"] = velocities[i]
        for op in ops:
            apply_combine(op, tensors)
        out.append(tensors["latents"].clone())
    return out


def _run_scheduler(solver, steps, shift, x, velocity_fn, mu=None):
    sched = scheduler_for(solver, shift, use_dynamic_shifting=mu is not None)
    kwargs = {}
    if mu is not None:
        import numpy as np
        kwargs = {"mu": mu, "sigmas": np.linspace(1.0, 1.0 / steps, steps)}
    sched.set_timesteps(steps, **kwargs)
    out, velocities, sample = [], [], x.clone()
    for i, t in enumerate(sched.timesteps):
        v = velocity_fn(i, sample)
        velocities.append(v)
        sample = sched.step(v, t, sample, return_dict=False)[0]
        out.append(sample.clone())
    return out, velocities, [float(t) for t in sched.timesteps]


def _two_models():
    """Two different 'models' (fixed linear maps of the sample), switching per step."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(SHAPE, generator=g) * 0.3
    b = torch.randn(SHAPE, generator=g) * 0.3
    plan_gen = torch.Generator().manual_seed(1)
    return lambda i, s: (s * 0.9 + a) if torch.rand((), generator=plan_gen) < 0.5 else (-0.5 * s + b)


@pytest.mark.parametrize("solver", ["euler", "unipc"])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_table_matches_diffusers_every_step(solver, shift):
    for steps in range(1, 51):
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
        ref, velocities, timesteps = _run_scheduler(solver, steps, shift, x, _two_models())
        table = make_solver_table(solver, steps, shift)
        assert table.timesteps == pytest.approx(timesteps, rel=0, abs=0)
        ours = _run_table(table, x, velocities)
        for i, (r, o) in enumerate(zip(ref, ours)):
            rel = ((r - o).norm() / r.norm().clamp_min(1e-12)).item()
            assert rel <= 1e-5, f"{solver} shift={shift} steps={steps} step {i}: rel err {rel:.2e}"


def test_euler_dynamic_shift_matches_ltx_style_schedule():
    steps, mu = 30, 1.1
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ref, velocities, timesteps = _run_scheduler("euler", steps, 1.0, x, _two_models(), mu=mu)
    table = make_solver_table("euler", steps, mu=mu)
    ours = _run_table(table, x, velocities)
    assert torch.allclose(ours[-1], ref[-1], rtol=1e-5, atol=1e-6)


def test_unknown_solver_and_zero_steps_raise():
    with pytest.raises(ValueError, match="unknown solver"):
        make_solver_table("ddim", 10)
    with pytest.raises(ValueError, match="steps must be"):
        make_solver_table("euler", 0)
