"""What the engines and the export know of each transformer class, handed down by its family module.

A family module (families/) registers its architecture here by diffusers class name: the
positional-signature wrapper, the step split and the FP32 islands. engines/signature.py,
engines/torch_engine.py and export/precision.py read them from here and test no model class
themselves. Registration runs one way only (families/ calls down into this table; nothing here
imports families/, not even by name), so whoever hands a transformer to the engines has imported
its family first: `flowblend.families` (the built-ins register on import) or a plugin's module.
Kept free of torch, so the registration costs nothing at start-up.
"""
from __future__ import annotations

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
    """The registered entry of a class name, or None (its family module has not been imported)."""
    return _ENTRIES.get(class_name)


def registered_classes() -> tuple[str, ...]:
    return tuple(_ENTRIES)
