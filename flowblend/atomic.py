"""The one atomic file writer: write beside the target under a unique temporary name, then rename.

Every artifact, record and report flowblend writes goes through `write_atomic`, so a failed or
interrupted run never leaves a half-written file where a reader looks (engine store, export records,
calibration reports, benchmark outputs, TensorRT timing caches). Two writers of one path never share
a temporary file (mkstemp), and the temporary file is removed if the write fails.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

Payload = Union[str, bytes, Callable[[Path], None]]  # text, bytes, or write(tmp_path) producing the file


def write_atomic(path: str | Path, data: Payload, suffix: str = ".partial") -> Path:
    """Write `data` to `path` atomically and return the path; `suffix` ends the temporary name (a writer that
    picks its format from the file name, such as matplotlib's savefig, needs the real one: ".partial.png")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    tmp = Path(name)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
