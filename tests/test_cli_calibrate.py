"""`flowblend calibrate divergence|plan`: toy pair end to end, tiny random Wan/LTX checkpoints through
the same command, the written plan accepted by `generate --plan-file`, and every bad input."""
import json

import pytest
import torch
from test_metrics import save_tiny_dino
from tiny_models import stand_in_decode

from flowblend.cli.main import main
from flowblend.families import loading as pairs
from flowblend.runtime.plan import BlendPlan

TOY_PROMPTS = ["--prompt", "a red circle moving left", "--prompt", "a blue square moving up"]


@pytest.fixture(scope="module")
def dino_path(tmp_path_factory):
    return save_tiny_dino(tmp_path_factory.mktemp("dino"))


def test_divergence_toy_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "div"
    rc = main(["calibrate", "divergence", "--steps", "4", "--no-progress", "--out-dir", str(out)] + TOY_PROMPTS)
    assert rc == 0
    data = json.loads((out / "divergence.json").read_text())
    assert len(data["summary"]["cosine_guided"]["mean"]) == 4 and data["prompts"] == TOY_PROMPTS[1::2]
    assert (out / "divergence.png").stat().st_size > 1000
    assert "divergence seed plan, LSL" in capsys.readouterr().out
    rc = main(["calibrate", "divergence", "--steps", "3", "--pattern", "any", "--threshold", "1e9", "--no-progress",
               "--out-dir", str(out)] + TOY_PROMPTS[:2])
    assert rc == 0 and "S3" in capsys.readouterr().out  # every step under an infinite threshold: all small


def test_plan_toy_end_to_end_then_generate_with_the_plan_file(tmp_path, capsys):
    out, report = tmp_path / "cal", tmp_path / "docs" / "cal-toy.md"
    rc = main(["calibrate", "plan", "--steps", "5", "--solver", "euler", "--reduced-steps", "3", "--no-progress",
               "--heldout-prompt", "a green triangle moving down", "--heldout-prompt", "a cyan circle moving right",
               "--out-dir", str(out), "--report", str(report)] + TOY_PROMPTS)
    assert rc == 0, capsys.readouterr().err
    assert "chosen plan" in capsys.readouterr().out
    plan = BlendPlan.from_json((out / "plan.json").read_text())
    data = json.loads((out / "calibration.json").read_text())
    assert data["chosen"]["models"] == list(plan.models) and data["setup"]["solver"] == "euler"
    assert {r["role"] for r in data["heldout"]} >= {"LLL", "SSS", "chosen"} or data["chosen_row"]["small_steps"] == 0
    assert {p.name for p in report.parent.iterdir()} == {"cal-toy.md", "cal-toy-divergence.png",
                                                         "cal-toy-quality-vs-flops.png"}
    assert "semantic_acc" in report.read_text()  # toy probes reported
    video = tmp_path / "v.gif"
    rc = main(["generate", "--plan-file", str(out / "plan.json"), "--prompt", "a red circle moving left",
               "--solver", "euler", "--out", str(video), "--no-progress"])
    assert rc == 0 and video.exists()


# -- tiny random Wan / LTX checkpoints through the same command --------------------------------------
TINY = {
    "wan": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
                text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32),
    "ltx": dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=2,
                attention_head_dim=8, cross_attention_dim=16, num_layers=1, caption_channels=16),
}


def _save_tiny(family, root):
    import diffusers

    cls = getattr(diffusers, pairs.get_family(family).transformer_class)
    for i, (name, width) in enumerate((("large", 2), ("small", 1))):
        torch.manual_seed(i)
        cfg = dict(TINY[family], num_attention_heads=width)
        if family == "ltx":
            cfg["cross_attention_dim"] = 8 * width
        model = cls(**cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.02)
        model.save_pretrained(root / name / "transformer")
    return root


def _fake_shared(monkeypatch, family):
    """The real text encoder and VAE need full checkpoints: stand in for them (the transformers are real)."""
    def encode(self, prompts):
        rows = [torch.randn(7, 16, generator=torch.Generator().manual_seed(sum(map(ord, p)))) for p in prompts]
        return torch.stack(rows), (torch.ones(len(prompts), 7, dtype=torch.int64) if family == "ltx" else None)

    monkeypatch.setattr(pairs._SharedComponents, "encode", encode)
    monkeypatch.setattr(pairs._SharedComponents, "decode", stand_in_decode)


@pytest.mark.parametrize("family,video", [("wan", ["--frames", "5", "--height", "16", "--width", "16"]),
                                          ("ltx", ["--frames", "9", "--height", "64", "--width", "64"])])
def test_plan_on_tiny_wan_and_ltx_checkpoints(tmp_path, monkeypatch, dino_path, family, video):
    root = _save_tiny(family, tmp_path / "ckpt")
    _fake_shared(monkeypatch, family)
    out = tmp_path / "cal"
    rc = main(["calibrate", "plan", "--pair", family, "--large", str(root / "large"), "--small", str(root / "small"),
               "--steps", "6", "--dino", dino_path, "--prompt", "a cat", "--prompt", "a dog", "--heldout-prompt",
               "a bird", "--heldout-prompt", "a fish", "--reduced-steps", "4", "--no-progress", "--out-dir", str(out)]
              + video)
    assert rc == 0
    data = json.loads((out / "calibration.json").read_text())
    assert data["metric"] == "dino" and len(data["chosen"]["models"]) == 6
    assert all("fd_dino" in r for r in data["candidates"]) and data["reduced_steps"] == 4
    assert (out / "calibration.md").exists() and (out / "calibration-quality-vs-flops.png").exists()


# -- bad input: exit 2, one line, nothing written ------------------------------------------------------
@pytest.mark.parametrize("extra,message", [
    (["--prompt-file", "EMPTY"], "no prompt given"),
    (["--prompt-file", "/no/such/prompts.txt"], "does not exist"),
    (["--tolerance", "0"] + TOY_PROMPTS, "outside (0, 1]"),
    (["--tolerance", "1.5"] + TOY_PROMPTS, "outside (0, 1]"),
    (["--metric", "dino", "--dino", "/no/such/dinov2"] + TOY_PROMPTS, "DINOv2 weights not found"),
    (["--clip", "/no/such/clip"] + TOY_PROMPTS, "--clip PATH"),
    (["--steps", "2"] + TOY_PROMPTS, "too few to form three stages"),
    (["--reduced-steps", "1"] + TOY_PROMPTS, "too few to form three stages"),
    (["--radius", "0"] + TOY_PROMPTS, "--radius 0 must be >= 1"),
    (["--pair", "wan"], "no prompt given"),
    (["--pair", "toy", "--metric", "toy", "--height", "30"] + TOY_PROMPTS, "multiples of 4"),
])
def test_plan_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, extra, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    extra = [str(empty) if x == "EMPTY" else x for x in extra]
    out = tmp_path / "out"
    rc = main(["calibrate", "plan", "--no-progress", "--out-dir", str(out)] + extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("extra,message", [
    (["--prompt-file", "EMPTY"], "no prompt given"),
    (["--steps", "0"] + TOY_PROMPTS, "--steps must be >= 1"),
    (["--seeds"] + ["--guidance", "-2"] + TOY_PROMPTS, None),
])
def test_divergence_bad_input(tmp_path, capsys, extra, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    extra = [str(empty) if x == "EMPTY" else x for x in extra]
    out = tmp_path / "out"
    if message is None:  # argparse refuses `--seeds` with no value: its own usage error, exit 2
        with pytest.raises(SystemExit) as exc:
            main(["calibrate", "divergence", "--out-dir", str(out)] + extra)
        assert exc.value.code == 2
        return
    rc = main(["calibrate", "divergence", "--no-progress", "--out-dir", str(out)] + extra)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not out.exists()
