"""Flags that several commands share, declared once as argument groups each command subscribes to.

As in Polygraphy's tools: a command lists the groups it takes (`subscribe(p, "pair", "video", ...)`)
and each group knows its flags, their help and defaults, and the one check that runs on them
before the command does (`check_groups`, called by cli/main.py before anything loads). The engine
and blend flags are not written here: each is a field of `EngineChoice` (assembly/choice.py) or
`BlendChoices` (resolve/blend_request.py) declared with `flowblend.settings.setting`, and
`add_settings` makes its flag (help, choices, type, default) when a parser is built; "engine" is
every EngineChoice field, so a field added there is a flag of generate, serve and bench at once. What the
flags mean is checked by plain functions outside cli/ (resolve/request.py, engines/factory.py)
that the server calls too. Nothing here imports torch.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping

from flowblend.errors import FlowblendError
from flowblend.settings import choices_of as setting_choices
from flowblend.settings import declared, default_of, flag_of

from ..engines.factory import check_dtype
from ..engines.kinds import EXPORT_PRECISIONS, precision
from ..families import FAMILIES, PairFamily, get_family
from ..resolve.blend_request import BlendChoices, video_of
from ..resolve.request import check_device, check_guidance
from ..runtime.graph_modes import GRAPH_FLAGS

__all__ = ["HelpFormatter", "Parser", "subscribe", "check_groups", "family_of", "choices_of", "FlowblendError"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default that is a value; a None default ("the family's") is said in the help itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in help_text or "%(default)" in help_text:
            return help_text
        return help_text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Every flowblend parser and subparser: defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def family_defaults(attr: str) -> str:
    """'toy 20, wan 50, ltx 40': each family's default for a flag left unset, read from the registry."""
    return ", ".join(f"{name} {getattr(f, attr):g}" for name, f in FAMILIES.items())


def _pair_name(p) -> None:
    p.add_argument("--pair", default="toy", help=f"model pair family: {' | '.join(FAMILIES)}")


def _pair(p) -> None:
    g = p.add_argument_group("model pair")
    _pair_name(g)
    g.add_argument("--large", help="large model checkpoint: a local diffusers folder or a hub id in your cache "
                                   "(default: the family's; toy: the shipped weights)")
    g.add_argument("--small", help="small model checkpoint (default: the family's; toy: the shipped weights)")
    g.add_argument("--allow-download", action="store_true", help="let diffusers download hub ids missing from the cache")


# The setting groups: each flag is a field of EngineChoice or BlendChoices (flowblend/settings.py), listed
# under its declared group; a command subscribes a group by name, or one setting by its field name.
GROUP_TITLES = {"plan": "blend plan", "video": "video size", "solver": "solver", "experts": "two experts (wan22)",
                "backend": "backend", "engine": "PyTorch engines (--backend torch / torch-compile)"}
BLEND_GROUPS = {"plan": ("plan",), "video": ("video",), "solver": ("solver",), "experts": ("experts",)}
ENGINE_GROUPS = {"device": ("device",), "dtype": ("dtype",), "artifacts": ("artifacts",)}


def _setting_fields(cls, groups: tuple[str, ...] | None):
    return [f for f in declared(cls) if groups is None or f.metadata["group"] in groups]


def add_settings(p, settings, repeat: Mapping[str, str] | None = None,
                 override: Mapping[str, dict] | None = None) -> None:
    """Add one flag per declared setting (help, choices, type and default from its field), each under the
    argument group its declaration names. `repeat`: settings taken several times (action append, no argparse
    choices: the command checks each value), with a note on what the list means; `override`: argparse keywords
    a command changes (build: its own engine kinds and default)."""
    repeat, override, titled = repeat or {}, override or {}, {}
    for f in settings:
        title = GROUP_TITLES.get(f.metadata["group"])
        target = p if title is None else titled.setdefault(title, p.add_argument_group(title))
        help_text = f.metadata["help"]
        if f.metadata["family_default"]:
            help_text += f" (default: the family's; {family_defaults(f.metadata['family_default'])})"
        kwargs = {"help": help_text, "default": default_of(f)}
        if f.metadata["type"] is not None:
            kwargs["type"] = f.metadata["type"]
        choices = setting_choices(f)
        if f.name in repeat:
            kwargs.update(action="append", default=None, help=f"{help_text} (repeatable; {repeat[f.name]})",
                          metavar=f.name.upper())
            if choices:
                kwargs["help"] += f"; one of {' | '.join(choices)}"
        elif choices:
            kwargs["choices"] = choices
        kwargs.update(override.get(f.name, {}))
        target.add_argument(flag_of(f.name), **kwargs)


def _engine_settings(groups: tuple[str, ...] | None):
    from ..assembly.choice import EngineChoice  # read when a parser is built: a field added there is a flag

    return _setting_fields(EngineChoice, groups)


def _graph(p) -> None:
    p.add_argument("--graph", default="none", choices=GRAPH_FLAGS,
                   help="CUDA graphs (--device cuda): the whole loop in one graph, one per step, or none; with "
                        "'whole' a served job's cancel takes effect when the loop ends")


def _threads(p) -> None:
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's, one per core; on a shared "
                                               "machine fewer threads degrade more gracefully)")


def _progress(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


GROUPS = {"pair": _pair, "pair_name": _pair_name, "graph": _graph, "threads": _threads, "progress": _progress}
SETTING_GROUPS = {**{name: (BlendChoices, groups) for name, groups in BLEND_GROUPS.items()},
                  **{name: (None, groups) for name, groups in ENGINE_GROUPS.items()},
                  "engine": (None, None)}  # "engine": every EngineChoice field, those added later too


def _settings_of(name: str):
    """The declared fields a subscribed name stands for: a setting group, or one setting by its field name."""
    if name in SETTING_GROUPS:
        cls, groups = SETTING_GROUPS[name]
        return _engine_settings(groups) if cls is None else _setting_fields(cls, groups)
    one = [f for f in (*_engine_settings(None), *declared(BlendChoices)) if f.name == name]
    if not one:
        raise KeyError(f"no flag group or setting named {name!r}")
    return one


def subscribe(p: argparse.ArgumentParser, *groups: str, repeat: Mapping[str, str] | None = None,
              override: Mapping[str, dict] | None = None) -> None:
    """Add the named shared groups' flags (or single settings') to a command and remember them for
    `check_groups`; `repeat` and `override` as in `add_settings`."""
    settings = []
    for name in groups:
        if name in GROUPS:
            GROUPS[name](p)
        else:
            settings += [f for f in _settings_of(name) if f not in settings]
    settings += [f for name in (repeat or {}) for f in _settings_of(name) if f not in settings]
    add_settings(p, settings, repeat, override)
    p.set_defaults(arg_groups=groups)


def apply_thread_policy(threads: int | None) -> None:
    """OpenMP threads sleep instead of spinning when they wait, so a shared CPU slows torch gracefully.

    Busy-waiting threads (OpenMP's default) made a toy generate loop ~40x slower beside another
    2-thread process on 2 cores (docs/shared-cpu.md). Both variables are read when torch loads, so
    this runs before torch is imported; `threads` then also caps torch's intra-op threads.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is None:
        return
    if threads < 1:
        raise FlowblendError(f"--threads must be >= 1, got {threads}")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:  # already loaded (a test calling main() in-process): set it directly
        import torch

        torch.set_num_threads(threads)


def check_groups(args: argparse.Namespace) -> None:
    """The shared groups' own checks, before the command runs: bad flags fail before anything loads."""
    groups = args.arg_groups
    apply_thread_policy(args.threads if "threads" in groups else None)
    if "pair" in groups or "pair_name" in groups:
        family = get_family(args.pair)
        if "video" in groups:
            video_of(choices_of(args), family)
    engine = "engine" in groups  # every EngineChoice flag: --device and --dtype among them
    if (engine or "dtype" in groups) and args.dtype is not None:
        check_dtype(args.dtype)
        if not engine and not precision(args.dtype).exportable:
            raise FlowblendError(f"--dtype {args.dtype} runs only in PyTorch engines (generate, serve, bench with "
                                 f"--backend torch); ONNX exports and built engines take {' | '.join(EXPORT_PRECISIONS)}")
    if engine and args.fp8_keep_blocks < 0:
        raise FlowblendError(f"--fp8-keep-blocks must be >= 0, got {args.fp8_keep_blocks}")
    if "guidance" in groups and args.guidance is not None:
        check_guidance(args.guidance)
    if "steps" in groups and args.steps is not None and args.steps < 1:
        raise FlowblendError(f"--steps must be >= 1, got {args.steps}")
    if engine or "device" in groups:
        check_device(args.device)  # imports torch only for a cuda device


def family_of(args) -> PairFamily:
    return get_family(args.pair)


def choices_of(args: argparse.Namespace) -> BlendChoices:
    """The plan, video, guidance, solver and experts flags as plain values (resolve/blend_request.py resolves
    them, for the server too); a flag the command does not take is None."""
    return BlendChoices.of(args)
