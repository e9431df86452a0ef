"""Loading what a FlowBlend pipeline adds to a diffusers checkpoint: the small transformer, or the toy pair."""
from __future__ import annotations

from pathlib import Path

from flowblend.errors import FlowblendError


def load_small_transformer(cls, source: str, torch_dtype=None, local_files_only: bool = False):
    """The small model's transformer from a diffusers checkpoint folder (its transformer/) or a transformer folder;
    ValueError naming `small` when it cannot be read."""
    root = Path(str(source)).expanduser()
    if str(source).startswith((".", "/", "~")) and not root.exists():
        raise ValueError(f"`small` {str(source)!r} does not exist: pass the small model's diffusers checkpoint "
                         "folder (with transformer/) or its hub id")
    subfolder = "transformer" if not root.exists() or (root / "transformer").is_dir() else None
    where = str(root) if root.exists() else str(source)
    try:
        found = cls.load_config(where, subfolder=subfolder, local_files_only=local_files_only).get("_class_name")
        if found != cls.__name__:
            raise ValueError(f"it holds a {found}, not a {cls.__name__}")
        dtype = {} if torch_dtype is None else {"torch_dtype": torch_dtype}  # diffusers >= 0.36 also says dtype=
        return cls.from_pretrained(where, subfolder=subfolder, local_files_only=local_files_only, **dtype).eval()
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"`small` {str(source)!r}: cannot load a {cls.__name__} from it ({reason}); pass a "
                         "diffusers checkpoint folder with transformer/, or local_files_only=False for a hub id") \
            from None


def toy_parts(torch_dtype, small: str | None):
    """The toy pair (shipped weights; `small` overrides the small model's folder) and its solver as a scheduler."""
    import torch

    from ..families import load_pair
    from ..runtime.solvers import scheduler_for

    try:
        pair = load_pair("toy", small=small, dtype=torch_dtype or torch.float32)
    except FlowblendError as exc:
        raise ValueError(f"`small`: {exc}") from None
    return pair, scheduler_for(pair.family.solver, pair.family.shift)
