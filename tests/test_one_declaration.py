"""Each engine and blend setting is declared once (issue 30): as a field of EngineChoice / BlendChoices.

A field added to EngineChoice from here, without touching the source, must become a flag of generate,
serve and bench, be parsed into the choice each of them hands over, and reach the engine factory; and
no module but cli/common.py (which reads the declarations) may declare one of those flags by hand.
"""
from __future__ import annotations

import re
import sys
from dataclasses import fields, make_dataclass
from pathlib import Path

import pytest
from test_assembly import Arrived, _bench, _generate, _serve

import flowblend.assembly.choice as choice_module
from flowblend.assembly import EngineChoice
from flowblend.cli.main import build_parser
from flowblend.engines import factory
from flowblend.resolve.blend_request import BlendChoices
from flowblend.serve.config import ServeConfig
from flowblend.settings import flag_of, setting

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def extended_choice(monkeypatch):
    """EngineChoice with one more engine option, `cfg` (how CFG's two forwards run), put wherever the
    original is named: the way a source edit adding the field would reach every module."""
    extended = make_dataclass("EngineChoice", [("cfg", str, setting("batched", "CFG's two forwards: one batch of "
                                                                    "2 or one after the other",
                                                                    choices=("batched", "sequential"),
                                                                    group="engine"))],
                              bases=(EngineChoice,), frozen=True)
    extended.__module__ = choice_module.__name__
    for module in list(sys.modules.values()):
        if getattr(module, "EngineChoice", None) is EngineChoice:
            monkeypatch.setattr(module, "EngineChoice", extended)
    return extended


@pytest.mark.parametrize("caller", [_generate, _serve, _bench], ids=["generate", "serve", "bench"])
def test_a_field_added_to_the_engine_choice_reaches_every_callers_flags_and_the_factory(
        caller, extended_choice, tmp_path, monkeypatch):
    arrived = []

    def recording(backend, pair, **kwargs):
        arrived.append(kwargs.get("cfg"))
        raise Arrived

    monkeypatch.setattr(factory, "make_engines", recording)
    with pytest.raises(Arrived):
        caller(["--cfg", "sequential"], tmp_path)
    assert arrived == ["sequential"]  # bench's eager reference is the first engine made: it carries the option too


@pytest.mark.parametrize("command", ["generate", "serve", "bench"])
def test_an_added_field_is_listed_in_help_with_its_declared_help_and_default(command, extended_choice):
    parser = build_parser((command,))
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[command]
    action = next(a for a in sub._actions if "--cfg" in a.option_strings)
    assert action.default == "batched" and action.choices == ("batched", "sequential")
    assert "CFG's two forwards" in action.help
    assert sub.parse_args(["--cfg", "sequential"]).cfg == "sequential"


def test_the_server_config_holds_the_choices_and_reads_flat_or_nested_keys():
    flat = ServeConfig.from_settings({"backend": "torch-compile", "steps": 4, "queue_size": 3})
    nested = ServeConfig.from_settings({"engine": {"backend": "torch-compile"}, "blend": {"steps": 4}, "queue_size": 3})
    assert flat == nested and flat.engine == EngineChoice(backend="torch-compile") and flat.blend == BlendChoices(steps=4)
    assert ServeConfig.from_settings(flat.to_dict()) == flat  # what the Ray replicas are sent
    from flowblend.errors import FlowblendError

    with pytest.raises(FlowblendError, match=r"unknown setting\(s\) \['stepz'\]"):
        ServeConfig.from_settings({"stepz": 4})
    own = {f.name for f in fields(ServeConfig)}
    declared = {f.name for cls in (EngineChoice, BlendChoices) for f in fields(cls)}
    assert not own & declared, f"ServeConfig declares engine/blend settings again: {sorted(own & declared)}"


def test_no_module_declares_an_engine_or_blend_flag_but_the_flag_group():
    flags = {flag_of(f.name) for cls in (EngineChoice, BlendChoices) for f in fields(cls)} | {"--graph"}
    pattern = re.compile(r"""add_argument\(\s*["'](--[\w-]+)["']""")
    packages = ("assembly", "bench", "calibrate", "cli", "engines", "export", "families", "pipelines", "resolve",
                "runtime", "serve", "toy")
    # toy/train.py's --steps/--guidance/--shift/--compile are training hyper-parameters of the toy models
    # (optimiser steps, evaluation grids, compiling the training step), not these run settings.
    allowed = {ROOT / "cli" / "common.py", ROOT / "toy" / "train.py"}
    found = [f"{path.relative_to(ROOT)}: {m.group(1)}" for package in packages for path in sorted((ROOT / package).glob("*.py"))
             if path not in allowed for m in pattern.finditer(path.read_text()) if m.group(1) in flags]
    assert not found, "flags declared outside cli/common.py's group (declare them on EngineChoice/BlendChoices):\n" + \
        "\n".join(found)
    common = (ROOT / "cli" / "common.py").read_text()
    hand_written = [m.group(1) for m in pattern.finditer(common) if m.group(1) in flags - {"--graph"}]
    assert not hand_written, f"cli/common.py spells declared settings by hand: {hand_written}"
