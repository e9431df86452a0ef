"""Every flag of every command has help and shows its default; every value an error suggests is accepted."""
import argparse
import re

import pytest

from flowblend.cli.common import HelpFormatter
from flowblend.cli.main import COMMANDS, build_parser, main
from flowblend.errors import FlowblendError
from flowblend.families import FAMILIES, get_family
from flowblend.resolve.request import check_device, validate_request


def _parsers(parser: argparse.ArgumentParser, path=("flowblend",)):
    yield " ".join(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, path + (name,))


def test_every_flag_has_help_and_shows_its_default():
    missing, no_default = [], []
    for path, parser in _parsers(build_parser()):
        assert parser.formatter_class is HelpFormatter, path
        formatter = HelpFormatter(path)
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            shown = formatter._get_help_string(action)
            if not (action.help or "").strip():
                missing.append(f"{path} {action.option_strings[0]}")
            elif action.default not in (None, False) and "default" not in shown:
                no_default.append(f"{path} {action.option_strings[0]}")
            elif action.default is None and action.type in (int, float) and "default" not in shown:
                no_default.append(f"{path} {action.option_strings[0]} (None: say what it falls back to)")
    assert not missing, "flags without help:\n" + "\n".join(missing)
    assert not no_default, "flags whose default --help does not show:\n" + "\n".join(no_default)


def test_help_lists_the_toy_vocabulary(capsys):
    for command in ("demo", "generate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "magenta" in out and "triangle" in out and "directions left, right, up, down" in out


def test_top_level_help_lists_every_command_without_importing_them(capsys):
    import subprocess
    import sys

    code = ("import sys; from flowblend.cli.main import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert all(name in out for name in COMMANDS) and out.strip().endswith("NO-TORCH")


def _suggestions(message: str) -> list[str]:
    """Values after 'try' / 'use' in an error: '... try 3 or 6', '... try 32x32', '... use cpu'."""
    tail = re.search(r"(?:try|use) (.+)$", message)
    return re.findall(r"[\w:.]+", tail.group(1)) if tail else []


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("frames", [0, -3, 1, 2, 5, 7, 8, 10, 80, 120])
def test_suggested_frame_counts_are_accepted(family, frames):
    fam = get_family(family)
    try:
        fam.check_video_shape(frames, fam.height, fam.width)
        return
    except FlowblendError as exc:
        suggested = [int(v) for v in _suggestions(str(exc)) if v.isdigit()]
    assert suggested, f"no suggestion for frames={frames}"
    for value in suggested:
        fam.check_video_shape(value, fam.height, fam.width)  # raises if a suggestion is refused


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("height,width", [(0, 0), (30, 32), (481, 833), (-16, 8), (1, 1000)])
def test_suggested_sizes_are_accepted(family, height, width):
    fam = get_family(family)
    with pytest.raises(FlowblendError) as info:
        fam.check_video_shape(fam.frames, height, width)
    (size,) = [v for v in _suggestions(str(info.value)) if "x" in v]
    h, w = (int(v) for v in size.split("x"))
    fam.check_video_shape(fam.frames, h, w)


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "nonsense", "mps", "cuda:-1"])
def test_suggested_device_is_accepted(device):
    import torch

    if torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has CUDA")
    with pytest.raises(FlowblendError) as info:
        check_device(device)
    for value in _suggestions(str(info.value)):
        if value in ("cpu", "cuda:0") and (value == "cpu" or torch.cuda.is_available()):
            assert check_device(value) == value


def test_cli_frames_zero_suggestion_round_trip(tmp_path, capsys):
    """`--frames 0` once suggested 1 or 2, both refused: feed the suggestion back to the same command."""
    args = ["plan", "--pair", "toy", "--frames"]
    assert main(args + ["0"]) == 2
    err = capsys.readouterr().err
    values = [v for v in _suggestions(err.strip()) if v.isdigit()]
    assert values
    for value in values:
        assert main(args + [value]) == 0, capsys.readouterr().err


def test_request_suggestions_are_accepted():
    fam = get_family("toy")
    for key, bad in (("frames", 4), ("height", 30), ("width", 2)):
        with pytest.raises(FlowblendError) as info:
            validate_request(fam, "a red circle moving left", **{key: bad})
        values = [v for v in _suggestions(str(info.value)) if v[0].isdigit()]
        assert values
        for value in values:
            height, _, width = value.partition("x")
            fixed = {"frames": int(value)} if key == "frames" else {"height": int(height), "width": int(width)}
            validate_request(fam, "a red circle moving left", **fixed)
