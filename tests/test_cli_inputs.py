"""What a new user hit (issue 14, part 3), each fed to the command as they typed it."""
import json
import os
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import flowblend.families as pairs
from flowblend.cli.main import main
from flowblend.errors import FlowblendError
from flowblend.families.toy_model import ToyTextEncoder
from flowblend.families.toy_vocab import COLOURS, DIRECTIONS, SHAPES, normalise_prompt
from flowblend.toy.data import PromptSpec, all_prompts

PROMPT = "a red circle moving left"


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading a pair."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad argument was refused")
    monkeypatch.setattr(pairs, "load_pair", refuse)


def _one_line_exit_2(capsys, rc, *must):
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    for text in must:
        assert text in err, err
    return err


# -- 2. toy prompts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["a purple cat jumping over a fence", "a red circle moving sideways",
                                    "un cercle rouge"])
def test_unknown_toy_words_are_refused_with_the_vocabulary(tmp_path, capsys, no_loading, prompt):
    rc = main(["generate", "--prompt", prompt, "--out", str(tmp_path / "x.gif")])
    err = _one_line_exit_2(capsys, rc, "unknown word")
    assert all(w in err for w in COLOURS + SHAPES + DIRECTIONS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("prompt", ["a red circle", "red blue circle moving left", "circle moving left up"])
def test_toy_prompts_need_one_colour_shape_and_direction(tmp_path, capsys, no_loading, prompt):
    rc = main(["generate", "--prompt", prompt, "--out", str(tmp_path / "x.gif")])
    _one_line_exit_2(capsys, rc, "one colour, one shape and one direction")


@pytest.mark.parametrize("variant", ["a red circle moving left.", "A Red Circle, moving LEFT!", "the red circle moving left",
                                     "an red circle moving left", "  red circle   moving left  ", "red circle left"])
def test_spellings_read_as_the_training_prompt(variant):
    assert normalise_prompt(variant) == PROMPT
    encoder = ToyTextEncoder()
    assert encoder.tokenize(normalise_prompt(variant)) == encoder.tokenize(PROMPT)
    assert PromptSpec.parse(variant) == PromptSpec("red", "circle", "left")


def test_training_prompts_are_their_own_normal_form():
    """toy/data.py's prompts (training and probes) are exactly what normalisation produces."""
    for spec in all_prompts():
        assert normalise_prompt(spec.text) == spec.text
        assert PromptSpec.parse(normalise_prompt(spec.text)) == spec


def test_encoder_refuses_unknown_words_instead_of_unk():
    with pytest.raises(FlowblendError, match="unknown word"):
        ToyTextEncoder().encode(["a purple cat"])
    embeds, mask = ToyTextEncoder().encode([PROMPT, ""])  # the empty negative prompt stays allowed
    assert mask[1].sum() == 0 and mask[0].sum() == 5


def test_trailing_period_moves_left(tmp_path):
    """The reported bug: "a red circle moving left." moved the circle right (its last word was <unk>)."""
    from flowblend.toy.probes import foreground_masks, read_colour, read_direction

    out = tmp_path / "left.gif"
    assert main(["generate", "--prompt", "a red circle moving left.", "--out", str(out), "--no-progress"]) == 0
    frames = iio.imread(out, index=None)[..., :3]  # [F, H, W, 3] uint8
    video = frames.transpose(3, 0, 1, 2).astype(np.float32) / 127.5 - 1.0
    masks = foreground_masks(video)
    assert read_direction(masks) == "left" and read_colour(video, masks) == "red"
    assert json.loads(out.with_suffix(".json").read_text())["prompt"] == PROMPT


# -- 3. devices -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cuda", "cuda:7", "nonsense", "cuda:x", "mps", "gpu"])
def test_device_strings_fail_in_one_line_before_loading(tmp_path, capsys, no_loading, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    for command in (["generate", "--prompt", PROMPT, "--out", str(tmp_path / "x.gif")], ["calibrate", "divergence"],
                    ["bench", "--out", str(tmp_path / "b")], ["verify", "--artifacts", str(tmp_path)]):
        rc = main(command + ["--device", device])
        _one_line_exit_2(capsys, rc, device)
    assert list(tmp_path.iterdir()) == []


# -- 5. Ctrl-C ----------------------------------------------------------------------------------------------
def test_ctrl_c_in_the_wired_function_is_one_line_exit_130(tmp_path, capsys, monkeypatch):
    from flowblend.runtime.text_to_video import TextToVideo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(TextToVideo, "__call__", interrupted)
    rc = main(["generate", "--prompt", PROMPT, "--steps", "2", "--out", str(tmp_path / "x.gif"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 130 and err == "flowblend generate: interrupted\n"
    assert list(tmp_path.iterdir()) == []


BLOCKED = "test hook: blocked inside the sampling loop"
# The child is `flowblend generate` with one step patched to block until a signal arrives (a sleep loop that never
# ends by itself: time.sleep returns early to run a signal's handler, which raises KeyboardInterrupt). It says so on
# stderr first, so the SIGINT is sent at a state that cannot finish before it, however loaded the machine is.
BLOCKING_GENERATE = f"""
import faulthandler, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for every thread's stack if it hangs
from flowblend.runtime.sampler import Sampler
step = Sampler.step
def blocking_step(self, i):
    if i == 1:  # step 0 ran and the progress bar is open (run_loop's `with tqdm`)
        print({BLOCKED!r}, file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
    return step(self, i)
Sampler.step = blocking_step
from flowblend.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _sigint_as_a_terminal_leaves_it() -> None:
    """The child's SIGINT at its default, as for a command in a terminal's foreground. A suite started in the
    background of a non-interactive shell (as CI runs it) inherits SIGINT ignored, and a Python started so keeps
    ignoring it (no KeyboardInterrupt handler): the child never sees the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_to_a_running_generate_is_one_line_exit_130(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING_GENERATE, "generate", "--prompt", PROMPT,
                             "--steps", "4", "--out", str(tmp_path / "x.gif")],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_sigint_as_a_terminal_leaves_it)
    try:
        seen = ""
        while BLOCKED not in seen:  # no deadline: the child either blocks (and says so) or exits (read ends)
            char = proc.stderr.read(1)
            if not char:
                break
            seen += char
        assert BLOCKED in seen, f"the child exited before the sampling loop: {seen[-2000:]}"
        proc.send_signal(signal.SIGINT)
        try:
            rest = proc.communicate(timeout=120)[1]  # a bound on a hang only; the child exits at once
        except subprocess.TimeoutExpired:  # say where it hangs: every thread's stack, from faulthandler
            proc.send_signal(signal.SIGUSR1)
            time.sleep(5)
            proc.kill()
            rest = proc.communicate()[1]
            pytest.fail(f"the child did not exit within 120 s of SIGINT; its output and stacks:\n{seen}{rest}")
    finally:
        proc.kill()
    lines = [line for line in rest.replace("\r", "\n").splitlines() if line.strip()]
    assert proc.returncode == 130 and lines[-1] == "flowblend generate: interrupted", seen + rest
    assert "Traceback" not in seen + rest
    assert list(tmp_path.iterdir()) == []


# -- 6/7. flags checked before anything loads -------------------------------------------------------------
@pytest.mark.parametrize("extra,message", [
    (["--guidance", "-1"], "guidance must be"), (["--threads", "0"], "--threads must be >= 1"),
    (["--seed", "-1"], "seed must be"), (["--frames", "0"], "try 3"), (["--solver", "heun"], None),
    (["--negative-prompt", "purple"], "unknown word"), (["--shift", "0"], "shift must be"),
])
def test_bad_flags_are_refused_before_loading(tmp_path, capsys, no_loading, extra, message):
    try:
        rc = main(["generate", "--prompt", PROMPT, "--out", str(tmp_path / "x.gif")] + extra)
    except SystemExit as exc:  # argparse's choices: its own two-line usage error, also exit 2
        assert exc.code == 2 and message is None
        return
    _one_line_exit_2(capsys, rc, message)


def test_guidance_is_refused_without_importing_torch():
    code = ("import sys; from flowblend.cli.main import main\n"
            f"rc = main(['generate', '--prompt', '{PROMPT}', '--guidance', '-1'])\n"
            "print(rc, sorted(m for m in ('torch', 'diffusers', 'onnx') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr


def test_threads_flag_caps_torch_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        assert main(["generate", "--prompt", PROMPT, "--steps", "2", "--threads", "1", "--no-progress",
                     "--out", str(tmp_path / "t.gif")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# -- 8. smaller ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair,unit", [("toy", "GFLOPs"), ("wan", "PFLOPs")])
def test_plan_picks_the_flop_unit_from_the_size(capsys, pair, unit):
    assert main(["plan", "--pair", pair]) == 0
    out = capsys.readouterr().out
    total = out.strip().splitlines()[-1]
    assert total.count(unit) == 2 and " 0.0 " not in total


def test_flop_units():
    from flowblend.cli.plan_cmd import format_flops

    assert format_flops(2.3e9) == "2.3 GFLOPs" and format_flops(1.5e13) == "15 TFLOPs"
    assert format_flops(4.2e15) == "4.2 PFLOPs" and format_flops(9.99e11) == "999 GFLOPs"


def test_wan_without_checkpoints_is_one_clean_line(tmp_path, capsys):
    rc = main(["generate", "--pair", "wan", "--prompt", "a cat", "--out", str(tmp_path / "x.mp4")])
    err = _one_line_exit_2(capsys, rc, "not in your Hugging Face cache", "--allow-download")
    assert "config.json" not in err and ".." not in err


def test_demo_shows_progress_and_labels_its_totals(tmp_path, capsys):
    rc = main(["demo", "--steps", "2", "--prompt", PROMPT, "--plan", "LLL", "--plan", "SSS", "--out-dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 0 and "demo" in captured.err and "2/2" in captured.err  # tqdm's bar over all videos
    assert "loop_s_all_videos" in captured.out and "of all `videos`" in captured.out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["videos"] for r in rows] == [1, 1]
    assert all(r["loop_s_per_video"] == pytest.approx(r["loop_s_all_videos"], abs=1e-3) for r in rows)


# -- 1. thread policy -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("given,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_unless_the_user_says_otherwise(given, expected):
    """The policy is set before torch loads (libgomp reads it once), and a user's own setting wins."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = ("import os, sys; from flowblend.cli.main import main\n"
            "seen = []\n"
            "import builtins; real = builtins.__import__\n"
            "def spy(name, *a, **k):\n"
            "    if name == 'torch' and 'torch' not in sys.modules: seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = spy\n"
            f"rc = main(['generate', '--prompt', '{PROMPT}', '--steps', '1', '--no-progress', '--out', sys.argv[1]])\n"
            "print(rc, seen[:1])")
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-c", code, os.path.join(tmp, "p.gif")], capture_output=True, text=True,
                              env=env, timeout=600)
    assert done.stdout.strip().splitlines()[-1] == f"0 ['{expected}']", done.stdout + done.stderr
