"""`flowblend generate` / `flowblend plan`: end to end on the toy pair, and every bad input."""
import json

import imageio.v3 as iio
import pytest

from flowblend.cli.main import main


def test_generate_toy_writes_video_and_record(tmp_path):
    out = tmp_path / "clip.gif"
    rc = main(["generate", "--pair", "toy", "--plan", "LSL:0.4,0.2", "--steps", "5", "--prompt",
               "a red circle moving left", "--out", str(out), "--no-progress"])
    assert rc == 0
    frames = iio.imread(out, index=None)
    assert frames.shape[0] == 9 and frames.shape[1:3] == (32, 32)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["plan"]["stages"] == "L2,S2,L1" and record["prompt"] == "a red circle moving left"


def test_generate_several_prompts_and_plan_file(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"steps": 4, "models": ["large", "small", "small", "large"]}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square moving up\n\na green triangle moving down\n")
    rc = main(["generate", "--pair", "toy", "--plan-file", str(plan), "--prompt-file", str(prompts),
               "--out", str(tmp_path / "v.gif"), "--no-progress", "--guidance", "1"])
    assert rc == 0
    assert (tmp_path / "v_0.gif").exists() and (tmp_path / "v_1.gif").exists()


@pytest.mark.parametrize("extra,message", [
    (["--pair", "sdxl"], "unknown pair"),
    (["--pair", "wan", "--large", "/no/such/ckpt", "--small", "/no/such/ckpt2"], "does not exist"),
    (["--height", "30"], "multiples of 4"),
    (["--pair", "wan", "--frames", "80"], "4k+1"),
    (["--pair", "ltx", "--frames", "120"], "8k+1"),
    (["--guidance", "-1"], "guidance must be a number >= 0"),
    (["--plan", "LSL:0.8,0.5"], "exceed 1"),
    (["--plan-file", "/no/plan.json"], "does not exist"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--dtype", "fp4"], "unknown dtype"),
    (["--backend", "onnxruntime", "--dtype", "fp8"], "--backend onnxruntime takes --dtype fp32 | fp16 | bf16, not fp8"),
    (["--backend", "onnxruntime", "--compile", "regional"], "--compile and --attention choose how PyTorch engines run"),
    (["--compile", "whole", "--compile-mode", "reduce-overhead"], "captures CUDA graphs of its own"),
    (["--fp8-keep-blocks", "-1"], "--fp8-keep-blocks must be >= 0"),
])
def test_bad_input_one_line_error_exit_2_no_output(tmp_path, capsys, extra, message):
    out = tmp_path / "bad.mp4"
    rc = main(["generate", "--prompt", "a red circle moving left", "--out", str(out), "--no-progress"] + extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_empty_prompt_list(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    rc = main(["generate", "--prompt-file", str(empty), "--out", str(tmp_path / "x.mp4")])
    assert rc == 2 and "no prompt given" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_plan_command_reports_flops(capsys):
    rc = main(["plan", "--pair", "wan", "--plan", "LSL:0.4,0.2", "--steps", "50"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "L20,S20,L10" in out and "30 large + 20 small" in out and "FLOP-ideal speedup" in out
    assert sum(1 for line in out.splitlines() if line.strip().startswith(("0 ", "49 "))) == 2
