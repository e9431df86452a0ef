"""Every run goes through the one assembly (assembly/run.py), issue 30 item 2: calibration, the demo, the
cost model, the real-size stage and the pipelines get their engines from it (so from engines/factory.py),
and no module outside assembly/ and engines/ makes a TorchEngine, Sampler or GraphRunner itself."""
import ast
from pathlib import Path

import pytest
import torch

from flowblend.engines import factory

ROOT = Path(__file__).resolve().parents[1]
MADE_BY_THE_ASSEMBLY = {"TorchEngine", "Sampler", "GraphRunner", "make_engines"}
# The folders that make them: engines/ (the factory), assembly/ (the run).
MAKERS = {"engines", "assembly"}
# Modules that still make one themselves, each with its reason; an entry here is a debt, not a rule.
EXCEPTIONS = {
    ("runtime/graph.py", "Sampler"): "a GraphRunner copies the sampler it was handed (same engines, plan, options, "
                                     "device, dtype) for each new shape it captures: no choice of its own",
}
PACKAGES = ("families", "export", "engines", "runtime", "resolve", "assembly", "pipelines", "calibrate", "bench",
            "toy", "serve", "cli")


def _calls(path: Path) -> set[str]:
    """Names in MADE_BY_THE_ASSEMBLY that `path` calls (as `Name(...)` or `module.Name(...)`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name in MADE_BY_THE_ASSEMBLY:
                found.add(name)
    return found


def test_no_module_outside_the_assembly_makes_engines_samplers_or_graph_runners():
    made = {(str(path.relative_to(ROOT)), name)
            for package in PACKAGES if package not in MAKERS
            for path in sorted((ROOT / package).glob("*.py")) for name in _calls(path)}
    unexplained = sorted(made - set(EXCEPTIONS))
    assert not unexplained, f"make these through assembly/run.py (engines_for/engines_over/sampler_for/runner_for): " \
                            f"{unexplained}"
    stale = sorted(set(EXCEPTIONS) - made)
    assert not stale, f"these no longer make their own: drop them from EXCEPTIONS: {stale}"


def test_the_scan_sees_a_direct_construction(tmp_path):
    """The control: the scan finds both spellings of a direct call, and only calls."""
    path = tmp_path / "m.py"
    path.write_text("from x import TorchEngine\nimport y\n\ndef f(m):\n    '''Sampler(engines, plan)'''\n"
                    "    return TorchEngine(m), y.GraphRunner(m)\n")
    assert _calls(path) == {"TorchEngine", "GraphRunner"}


@pytest.fixture
def factory_calls(monkeypatch):
    """Every call of the one engine factory, as (backend, compile, split_constants)."""
    calls = []
    make = factory.make_engines

    def recording(backend, pair, **kw):
        calls.append((backend, kw.get("compile"), kw.get("split_constants", True)))
        return make(backend, pair, **kw)

    monkeypatch.setattr(factory, "make_engines", recording)
    return calls


def test_calibration_gets_eager_engines_from_the_assembly(factory_calls, tmp_path):
    from flowblend.cli.main import main

    rc = main(["calibrate", "divergence", "--steps", "3", "--no-progress", "--out-dir", str(tmp_path),
               "--prompt", "a red circle moving left"])
    assert rc == 0 and factory_calls == [("torch", "none", True)]  # eager on every device, as it always ran


def test_calibrate_plan_without_engines_makes_them_through_the_assembly(factory_calls):
    from flowblend.calibrate import boundaries
    from flowblend.calibrate.divergence import SamplingSetup

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    pair = _toy_pair()
    family = pair.family
    setup = SamplingSetup(3, family.solver, family.shift, family.guidance,
                          tuple(family.latent_shape(family.frames, family.height, family.width)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("flowblend.calibrate.divergence.make_requests", stop)  # the engines are made before this
        with pytest.raises(Stop):
            boundaries.calibrate_plan(pair, ["a red circle moving left"], [0], setup, None)
    assert factory_calls == [("torch", "none", True)]


def test_the_demo_gets_its_engines_from_the_assembly(factory_calls):
    from flowblend.runtime.plan import BlendPlan
    from flowblend.toy.demo import generate_plans

    results = generate_plans(_toy_pair(), [BlendPlan.parse("LSL", 3)], ["a red circle moving left"], [0])
    assert len(results[0].videos) == 1 and factory_calls == [("torch", "none", True)]


def test_the_cost_model_gets_both_engine_kinds_from_the_assembly(factory_calls):
    from flowblend.bench.runtime_cost import tiny_wan_overhead

    result = tiny_wan_overhead(1, {"solver": "unipc", "shift": 3.0}, 4.0, 3, torch.device("cpu"))
    assert result["max_abs_diff_vs_bare"] < 1e-4
    assert sorted(factory_calls) == [("torch", "none", False), ("torch", "none", True)]


def test_the_real_size_stage_gets_its_engines_from_the_assembly(factory_calls):
    from flowblend.bench.fullsize import EngineOption, FullsizeSettings, FullsizeStage
    from flowblend.bench.tiny import TEXT, WAN_LATENT, WAN_TINY

    settings = FullsizeSettings(configs={"small": dict(WAN_TINY["small"])}, device=torch.device("cpu"),
                                dtype=torch.float32, latent=WAN_LATENT, text=TEXT, reps=1, options=(EngineOption("eager"),))
    stage = FullsizeStage(settings)
    stage.build()
    row = stage.per_step("small", EngineOption("eager"))
    assert row["status"] == "pass" and factory_calls == [("torch", "none", True)]
    refused = stage.per_step("small", EngineOption("fp8", {"dtype": "fp8"}))  # FP8 computes in BF16, not the stage's
    assert refused["status"] == "skipped" and "computes in torch.bfloat16" in refused["reason"]
    assert len(factory_calls) == 1  # refused before any engine was made: the stage's models are never cast


def test_the_pipelines_runner_gets_its_engines_from_the_assembly(factory_calls):
    from flowblend.assembly import EngineChoice, TransformersOnly
    from flowblend.pipelines.runner import blend_runner
    from flowblend.runtime.plan import BlendPlan
    from flowblend.runtime.sampler import SamplerOptions

    pair = _toy_pair()
    family = pair.family
    latent_shape = family.latent_shape(family.frames, family.height, family.width)
    runner = blend_runner(pair.transformers, BlendPlan.parse("LLL", 3), SamplerOptions(), EngineChoice(),
                          graph_mode="eager", family_name="toy", latent_shape=latent_shape)
    assert set(runner.sampler.engines) == {"large"}  # only the models the plan runs
    assert factory_calls == [("torch", None, True)]
    assert TransformersOnly(family, {}).transformers == {}


def _toy_pair():
    from flowblend.families import load_pair

    return load_pair("toy")
