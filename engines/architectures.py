"""What the engines and the export know of each transformer class, handed down by its family module.

A family module (flowblend/families/) registers its architecture here by diffusers class name: the
positional-signature wrapper, the step split and the FP32 islands. engines/signature.py,
engines/torch_engine.py and export/precision.py read them from here and test no model class
themselves. Kept free of torch, so the registration costs nothing at start-up.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ClassEntry:
    """`wrap(transformer, **kw)` -> signed module; `step_split(signed)` -> split module or None."""

    wrap: Callable
    step_split: Callable
    fp32_islands: tuple[str, ...]


_ENTRIES: dict[str, ClassEntry] = {}


def register_class(class_name: str, entry: ClassEntry, wrapper_name: str | None = None) -> None:
    """Register a transformer class (and its wrapper's class name: a wrapped module keeps its step split)."""
    _ENTRIES[class_name] = entry
    if wrapper_name:
        _ENTRIES[wrapper_name] = ClassEntry(lambda signed, **_: signed, entry.step_split, entry.fp32_islands)


def entry_for(class_name: str) -> ClassEntry | None:
    """The registered entry of a class name, or None."""
    if not _ENTRIES:
        # The built-in families register when their package is imported; a model built directly from
        # diffusers (tests, scripts) may come first. Resolved by name: engines/ never imports it.
        importlib.import_module("flowblend.families")
    return _ENTRIES.get(class_name)


def registered_classes() -> tuple[str, ...]:
    return tuple(_ENTRIES)
