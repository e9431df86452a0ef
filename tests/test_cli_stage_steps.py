"""`--solver dpm++` and per-stage step counts through the CLI: `flowblend plan` costs, `generate`, refusals."""
import json

import pytest

from flowblend.bench.flops import step_flops
from flowblend.cli.main import main
from flowblend.families import get_family, reference_configs


def test_plan_prints_the_stage_costs_of_a_distilled_middle_stage(capsys):
    assert main(["plan", "--pair", "ltx", "--plan", "L20,D4,L10"]) == 0
    out = capsys.readouterr().out
    assert "L20,D4,L10 = L20,D4/10,L10" in out and "over a 40-step base schedule" in out
    stages = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("L20 ", "D4/10 ", "L10 "))}
    assert set(stages) == {"L20", "D4/10", "L10"}
    assert stages["D4/10"][1:5] == ["distilled", "4", "10", "1"]  # the distilled model at guidance 1
    # the costs against the analytic FLOP model (tests/test_flops.py checks it against torch's counter)
    fam = get_family("ltx")
    shape, configs = fam.latent_shape(fam.frames, fam.height, fam.width), reference_configs("ltx")
    large = step_flops(fam.transformer_class, configs["large"], shape, fam.text_len, True)
    distilled = step_flops(fam.transformer_class, configs["distilled"], shape, fam.text_len, False)  # batch 1
    assert float(stages["D4/10"][5]) == pytest.approx(4 * distilled / 1e12, rel=1e-3)
    assert float(stages["L20"][5]) == pytest.approx(20 * large / 1e12, rel=1e-3)
    total = 30 * large + 4 * distilled
    assert f"{100 * (1 - total / (40 * large)):.1f}% fewer" in out and "vs LLL" in out


def test_plan_with_dpmpp_solver(capsys):
    assert main(["plan", "--pair", "toy", "--plan", "LSL:0.4,0.2", "--solver", "dpm++", "--steps", "10"]) == 0
    assert "dpm++ shift 3" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["plan", "--pair", "ltx", "--plan", "L20,D4/30,L10"], "sum to 60 but steps=40"),
    (["plan", "--pair", "toy", "--plan", "L8,D3,L4"], "unknown model letter|not of the form"),
    (["plan", "--pair", "ltx", "--plan", "L20,D4/0,L10"], "needs >= 1 step"),
    (["plan", "--pair", "ltx", "--plan", "L20,D4@x,L10"], "not of the form"),
    (["plan", "--pair", "wan22", "--plan", "H10,S4/10,L20"], "not supported for two-expert pairs"),
])
def test_bad_stage_plans_are_one_line_errors(capsys, argv, message):
    import re

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1 and "Traceback" not in err


def test_an_unknown_solver_is_refused_by_the_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--pair", "toy", "--solver", "dpm"])
    assert exc.value.code == 2 and "dpm++" in capsys.readouterr().err  # argparse lists the choices


def test_generate_runs_stage_steps_with_dpmpp(tmp_path):
    out = tmp_path / "clip.gif"
    rc = main(["generate", "--pair", "toy", "--plan", "L4,S2/4@1,L2", "--steps", "10", "--solver", "dpm++",
               "--prompt", "a red circle moving left", "--out", str(out), "--no-progress"])
    assert rc == 0 and out.exists()
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["plan"]["stages"] == "L4,S2/4@1,L2" and record["plan"]["segments"] == [[4, 4], [2, 4], [2, 2]]
    assert record["guidance_per_step"] == [4.0] * 4 + [1.0] * 2 + [4.0] * 2  # the toy's CFG 4, the stage's own 1


def test_the_request_check_shared_with_the_server_takes_dpmpp_and_stage_plans():
    from flowblend.errors import FlowblendError
    from flowblend.resolve.request import validate_request

    toy = get_family("toy")
    request = validate_request(toy, "a red circle moving left", plan="L8,S3,L4", solver="dpm++3m")
    assert request.solver == "dpm++3m" and request.plan.label == "L8,S3/8,L4" and request.steps == 15
    with pytest.raises(FlowblendError, match="unknown solver 'dpm'.*dpm\\+\\+"):
        validate_request(toy, "a red circle moving left", solver="dpm")
