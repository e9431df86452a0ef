"""Solver tables against diffusers' schedulers, step by step (the reference)."""
import pytest
import torch

from flowblend.runtime.solvers import make_solver_table, scheduler_for
from flowblend.runtime.step import apply_combine

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


def _reference_scheduler(solver, shift, dynamic=False):
    """The diffusers scheduler configured here, never through runtime/solvers.py's scheduler_for (comparing the
    code with itself would pass a wrong option). UniPC as diffusers' Wan pipelines configure it
    (UniPCMultistepScheduler(prediction_type='flow_prediction', use_flow_sigmas=True, flow_shift=...), the
    Wan-AI *-Diffusers scheduler configs: order 2, bh2, x0-prediction, lower order and a zero sigma at the
    end); Euler as FlowMatchEulerDiscreteScheduler(shift=...) of the LTX/Flux-style pipelines."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if solver == "unipc":
        return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=shift, solver_order=2, solver_type="bh2",
                                       predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
                                       use_dynamic_shifting=dynamic)
    assert solver == "euler"
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=dynamic)


def _run_scheduler(solver, steps, shift, x, velocity_fn, mu=None):
    sched = _reference_scheduler(solver, shift, dynamic=mu is not None)
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
        assert _mismatch(solver, steps, shift) is None


def _mismatch(solver, steps, shift):
    """Why the table differs from the reference scheduler at `steps` steps, or None."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    ref, velocities, timesteps = _run_scheduler(solver, steps, shift, x, _two_models())
    table = make_solver_table(solver, steps, shift)
    if list(table.timesteps) != timesteps:
        return f"{solver} shift={shift} steps={steps}: timesteps {table.timesteps} != {timesteps}"
    for i, (r, o) in enumerate(zip(ref, _run_table(table, x, velocities))):
        rel = ((r - o).norm() / r.norm().clamp_min(1e-12)).item()
        if rel > 1e-5:
            return f"{solver} shift={shift} steps={steps} step {i}: rel err {rel:.2e}"
    return None


@pytest.mark.parametrize("solver,wrong", [("unipc", {"final_sigmas_type": "sigma_min"}), ("unipc", {"flow_shift": 4.0}),
                                          ("euler", {"shift": 4.0})])
def test_the_reference_check_sees_a_wrong_scheduler_option(monkeypatch, solver, wrong):
    """Control: runtime/solvers.py building its scheduler with a wrong option fails the comparison above."""
    from flowblend.runtime import solvers

    real = solvers.scheduler_for

    def wrong_scheduler(*args, **kwargs):
        sched = real(*args, **kwargs)
        return type(sched).from_config(sched.config, **wrong)

    monkeypatch.setattr(solvers, "scheduler_for", wrong_scheduler)
    assert any(_mismatch(solver, steps, 3.0) for steps in (4, 10, 20))


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


def test_the_step_formulas_on_tensors_match_diffusers():
    """runtime/step.py's formulas run on real tensors (no table) reproduce the schedulers' steps."""
    from flowblend.runtime.step import euler_update, flow_data_prediction, unipc_corrector, unipc_predictor

    steps, shift = 12, 3.0
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    for solver in ("euler", "unipc"):
        ref, velocities, _ = _run_scheduler(solver, steps, shift, x, _two_models())
        sigmas = make_solver_table(solver, steps, shift).sigmas
        sigmas = torch.tensor(sigmas, dtype=torch.float32)
        sample, x0, last, order = x.clone(), [], None, lambda i: min(2, steps - i, i + 1)  # noqa: E731
        for i, v in enumerate(velocities):
            if solver == "euler":
                sample = euler_update(sample, v, sigmas[i], sigmas[i + 1])
            else:
                x0.append(flow_data_prediction(sample, v, sigmas[i]))
                if i > 0:
                    older = (x0[i - 2], sigmas[i - 2]) if order(i - 1) == 2 else (None, None)
                    sample = unipc_corrector(last, x0[i], x0[i - 1], older[0], sigmas[i], sigmas[i - 1], older[1])
                last = sample
                older = (x0[i - 1], sigmas[i - 1]) if order(i) == 2 else (None, None)
                sample = unipc_predictor(sample, x0[i], older[0], sigmas[i + 1], sigmas[i], older[1])
            rel = ((sample - ref[i]).norm() / ref[i].norm()).item()
            assert rel <= 1e-5, f"{solver} step {i}: rel err {rel:.2e}"


def test_a_formula_over_symbols_is_the_table_entry_that_applies_it():
    from flowblend.runtime.step import Combine, Lin, unipc_predictor

    g = torch.Generator().manual_seed(2)
    tensors = {name: torch.randn(SHAPE, generator=g) for name in ("latents", "x0_0", "x0_1")}
    sigmas = torch.tensor([0.9, 0.7, 0.4])
    expected = unipc_predictor(tensors["latents"], tensors["x0_1"], tensors["x0_0"], sigmas[2], sigmas[1], sigmas[0])
    op = Combine.of("latents", unipc_predictor(Lin.of("latents"), Lin.of("x0_1"), Lin.of("x0_0"), sigmas[2],
                                               sigmas[1], sigmas[0]))
    assert [name for name, _ in op.terms] == ["latents", "x0_1", "x0_0"]
    apply_combine(op, tensors)
    torch.testing.assert_close(tensors["latents"], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_a_schedule_from_a_checkpoints_own_scheduler_is_followed(solver):
    """SamplerOptions.schedule: (timesteps, sigmas) of a scheduler, here one with an option the solver name and
    shift cannot say (Euler: shift_terminal), give the table of that scheduler passed in, not the default's."""
    from flowblend.runtime.solvers import schedule_of

    config = {"shift_terminal": 0.1} if solver == "euler" else {}
    scheduler = scheduler_for(solver, 3.0, **config)
    scheduler.set_timesteps(7)
    from_schedule = make_solver_table(solver, 7, schedule=schedule_of(scheduler))
    assert from_schedule == make_solver_table(solver, 7, scheduler=scheduler_for(solver, 3.0, **config))
    if solver == "euler":
        assert from_schedule.sigmas != make_solver_table(solver, 7, 3.0).sigmas  # shift_terminal moved them
    with pytest.raises(ValueError, match="7 steps need 7 and 8"):
        make_solver_table(solver, 7, schedule=(from_schedule.timesteps[:-1], from_schedule.sigmas))

def _diffusers_dpmpp(order, shift, mu=None):
    """DPM-Solver++ for flow matching configured here, not through runtime/solvers.py: the options diffusers
    documents for flow models (flow_prediction, use_flow_sigmas, flow_shift), multistep midpoint."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, solver_order=order, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=shift, algorithm_type="dpmsolver++",
                                       use_dynamic_shifting=mu is not None)


def _run_diffusers(sched, steps, x, velocity_fn, mu=None):
    sched.set_timesteps(steps, **({} if mu is None else {"mu": mu}))
    out, velocities, sample = [], [], x.clone()
    for i, t in enumerate(sched.timesteps):
        v = velocity_fn(i, sample)
        velocities.append(v)
        sample = sched.step(v, t, sample, return_dict=False)[0]
        out.append(sample.clone())
    return out, velocities, [float(t) for t in sched.timesteps]


@pytest.mark.parametrize("solver,order", [("dpm++", 2), ("dpm++3m", 3)])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_dpmpp_table_matches_diffusers_every_step(solver, order, shift):
    """1..50 steps; the 'model' switches at random steps, so the history carries the other model's predictions."""
    for steps in range(1, 51):
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
        ref, velocities, timesteps = _run_diffusers(_diffusers_dpmpp(order, shift), steps, x, _two_models())
        table = make_solver_table(solver, steps, shift)
        assert table.timesteps == pytest.approx(timesteps, rel=0, abs=0)
        ours = _run_table(table, x, velocities)
        for i, (r, o) in enumerate(zip(ref, ours)):
            rel = ((r - o).norm() / r.norm().clamp_min(1e-12)).item()
            assert rel <= 1e-5, f"{solver} shift={shift} steps={steps} step {i}: rel err {rel:.2e}"


@pytest.mark.parametrize("solver,order", [("dpm++", 2), ("dpm++3m", 3)])
def test_dpmpp_dynamic_shift_matches_diffusers(solver, order):
    steps, mu = 20, 1.1
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    ref, velocities, _ = _run_diffusers(_diffusers_dpmpp(order, 1.0, mu), steps, x, _two_models(), mu=mu)
    ours = _run_table(make_solver_table(solver, steps, mu=mu), x, velocities)
    for i, (r, o) in enumerate(zip(ref, ours)):
        assert ((r - o).norm() / r.norm()).item() <= 1e-5, f"{solver} mu={mu} step {i}"


def test_dpmpp_table_refuses_options_it_does_not_reproduce():
    with pytest.raises(ValueError, match="DPM\\+\\+ table supports"):
        make_solver_table("dpm++", 10, scheduler=scheduler_for("dpm++", 3.0, solver_type="heun"))
