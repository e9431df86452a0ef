"""What a record read from the results directory must be before anything uses it, and the result files it may name.

Anything on disk may have been written by something else (a hand edit, another program, an attacker with write
access to the results directory). A record is checked field by field as it is read (`check_record`): a wrong type,
an unknown status or an owner that is not an owner id (serve/jobs.py names lock files after it) makes it "not a
job record", skipped with one log line, never a 500 of the listing or a failed start. A result is served only
from the name the server itself writes, opened without following a symbolic link anywhere below the results
directory (`open_result`), and only if it is a regular file.
"""
from __future__ import annotations

import os
import re
import stat

JOB_ID = re.compile(r"video_[0-9a-f]{32}")  # what new_job_id makes (serve/jobs.py)
OWNER = re.compile(r"[A-Za-z0-9_-]{1,64}")  # an owner id: "<pid>-<8 hex>" by default; a safe file name, no dots
STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled")
RESULT_NAMES = ("video.mp4", "video.gif", "thumbnail.png")  # what serve/results.py writes into a job folder
_NUMBER, _TEXT = (int, float), (str,)
_OPTIONAL = {"pair": _TEXT, "started_at": _NUMBER, "finished_at": _NUMBER, "model": _TEXT, "error": _TEXT,
             "video": _TEXT, "thumbnail": _TEXT, "remixed_from": _TEXT, "body": (dict,), "error_code": _TEXT}
_REQUIRED = {"id": _TEXT, "request": (dict,), "owner": _TEXT, "status": _TEXT, "created_at": _NUMBER,
             "step": (int,), "steps": (int,), "models": (list,), "timings": (dict,), "retryable": (bool,)}


def valid_owner(owner: object) -> bool:
    return isinstance(owner, str) and OWNER.fullmatch(owner) is not None


def check_record(data: object, job_id: str) -> None:
    """TypeError naming the first field of `data` (a record's JSON object) that is not what a record holds."""
    if not isinstance(data, dict):
        raise TypeError(f"a {type(data).__name__}, not an object")
    for key, types in (*_REQUIRED.items(), *_OPTIONAL.items()):
        if key not in data:
            continue  # a missing required key is JobRecord's own TypeError; a missing optional one takes its default
        value = data[key]
        if value is None and key in _OPTIONAL:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise TypeError(f"field {key!r} is a {type(value).__name__}")
    if data.get("id", job_id) != job_id:
        raise TypeError(f"field 'id' is {str(data['id'])[:80]!r}, not its folder's name")
    if "owner" in data and not valid_owner(data["owner"]):
        raise TypeError(f"field 'owner' is not an owner id ({str(data['owner'])[:40]!r})")
    if data.get("status", "queued") not in STATUSES:
        raise TypeError(f"field 'status' is {str(data['status'])[:40]!r}")
    if not all(isinstance(m, str) for m in data.get("models", [])):
        raise TypeError("field 'models' holds something other than model names")
    if data.get("step", 0) < 0 or data.get("steps", 0) < 0:
        raise TypeError("a negative step count")


def open_result(jobs_dir: os.PathLike, job_id: str, name: str) -> int | None:
    """A read-only descriptor of the regular file `jobs_dir/job_id/name`, or None: no such name among the ones the
    server writes, a symbolic link at the job folder or the file (O_NOFOLLOW), or not a regular file. The caller
    closes it."""
    if name not in RESULT_NAMES or "/" in job_id or job_id in ("", ".", ".."):
        return None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fds: list[int] = []
    try:
        fds.append(os.open(jobs_dir, flags | os.O_DIRECTORY))
        fds.append(os.open(job_id, flags | os.O_DIRECTORY, dir_fd=fds[-1]))
        fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=fds[-1])  # O_NONBLOCK: a FIFO must not hang the open
    except OSError:
        return None
    finally:
        for d in fds:
            os.close(d)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return fd


def fd_path(fd: int, fallback: str) -> str:
    """A path that opens the very file `fd` is (Linux's /proc/self/fd: a swap of the name after the checks changes
    nothing); elsewhere `fallback`, the checked path."""
    path = f"/proc/self/fd/{fd}"
    return path if os.path.exists(path) else fallback
