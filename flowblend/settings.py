"""A setting declared once: a dataclass field that carries its own help, choices and value type.

`EngineChoice` (assembly/choice.py) and `BlendChoices` (resolve/blend_request.py) declare their fields
with `setting`; the CLI's flag group (cli/common.py), the server's config (serve/config.py), its config
files and request schema read those declarations instead of spelling the settings again, so a field
added there is a flag of every command, a config key and a factory argument at once.
"""
from __future__ import annotations

from dataclasses import MISSING, Field, field, fields
from typing import Any, Callable, Iterable, Mapping

from .errors import FlowblendError


def setting(default: Any, help: str, *, choices: Iterable[str] | Callable[[], Iterable[str]] | None = None,
            type: Callable | None = None, group: str = "", family_default: str | None = None) -> Any:
    """A dataclass field with the one declaration of its flag: `help`, `choices` (or a function giving them,
    read when a parser is built), `type` (str unless given), the CLI `group` it is listed under, and for a
    None default the family attribute (`family_default`) whose per-family values --help names."""
    return field(default=default, metadata={"help": help, "choices": choices, "type": type, "group": group,
                                            "family_default": family_default})


def declared(cls) -> tuple[Field, ...]:
    """The fields of `cls` declared with `setting` (in declaration order)."""
    return tuple(f for f in fields(cls) if "help" in f.metadata)


def help_of(cls, name: str) -> str:
    """The declared help of one setting (the server's request schema shows it as the field's description)."""
    return next(f.metadata["help"] for f in declared(cls) if f.name == name)


def choices_of(f: Field) -> tuple[str, ...] | None:
    choices = f.metadata.get("choices")
    return tuple(choices() if callable(choices) else choices) if choices is not None else None


def flag_of(name: str) -> str:
    """`compile_mode` -> `--compile-mode`: every setting's flag is its field name."""
    return "--" + name.replace("_", "-")


def default_of(f: Field) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def split_settings(values: Mapping[str, Any], nested: Mapping[str, type]) -> tuple[dict, dict[str, dict]]:
    """Flat or nested config keys -> (the rest, {section: its settings}): `steps: 4` and `blend: {steps: 4}`
    both land in the `blend` section when `nested` maps "blend" to BlendChoices. A key in two sections'
    declarations is refused (it would be ambiguous)."""
    owner = {}
    for section, cls in nested.items():
        for f in fields(cls):
            owner[f.name] = section
    rest, sections = {}, {section: {} for section in nested}
    for key, value in values.items():
        if key in nested and isinstance(value, Mapping):
            sections[key].update(value)
        elif key in owner:
            sections[owner[key]][key] = value
        else:
            rest[key] = value
    for section, cls in nested.items():
        unknown = sorted(set(sections[section]) - {f.name for f in fields(cls)})
        if unknown:
            raise FlowblendError(f"unknown {section} setting(s) {unknown}: use {', '.join(f.name for f in fields(cls))}")
    return rest, sections
