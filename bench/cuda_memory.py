"""What held the CUDA memory at a run's peak, from the allocator's own history.

`torch.cuda.memory._snapshot()` (documented in torch/cuda/memory.py) returns the blocks alive now
(`segments[].blocks[]`, state "active_allocated") and, while `_record_memory_history` was on, the
trace of every alloc/free with the Python stack of the allocation. Walking that trace backwards
from the blocks alive at the end gives the live set at every moment; the largest is the peak,
and grouping its blocks by the first frame inside flowblend or diffusers says who holds each MiB.
Blocks allocated before the history began have no trace entry: they are one named group.
"""
from __future__ import annotations

from collections import defaultdict

BEFORE = "allocated before the history began (weights, buffers, workspaces of earlier streams)"
OWN_CODE = ("flowblend", "/runtime/", "/engines/", "/bench/", "/scripts/", "diffusers/")


def _owner(frames: list[dict]) -> str:
    for frame in frames or ():
        name = frame.get("filename", "")
        if any(part in name for part in OWN_CODE):
            short = name.split("site-packages/")[-1]
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    if frames:
        first = frames[0]
        return f"{first.get('filename', '?')}:{first.get('line')} {first.get('name')}"
    return "no Python frame (allocated inside a C++ library call)"


def _frees(entry: dict, freed: set) -> bool:
    """A free takes a block out of the allocated count at its request; its completion then changes nothing."""
    if entry["action"] == "free_requested":
        freed.add(entry["addr"])
        return True
    if entry["action"] == "free_completed":
        if entry["addr"] in freed:
            freed.discard(entry["addr"])
            return False
        return True
    return False


def peak_attribution(snapshot: dict, device: int = 0, top: int = 12) -> dict:
    """The live blocks at the allocation peak the trace shows, grouped by owner, largest first."""
    end = {}  # addr -> size of blocks alive when the snapshot was taken
    for segment in snapshot.get("segments", ()):
        if segment.get("device", device) != device:
            continue
        for block in segment.get("blocks", ()):
            if block.get("state") == "active_allocated":
                end[block["address"]] = block["size"]
    traces = snapshot.get("device_traces") or []
    trace = [e for e in (traces[device] if device < len(traces) else []) if e.get("action") in
             ("alloc", "free_requested", "free_completed")]
    # Alive before the history began: blocks alive at the end that the trace never allocated, and
    # blocks whose first event in the trace is a free.
    first_event = {}
    for entry in trace:
        first_event.setdefault(entry["addr"], entry)
    start = {addr: size for addr, size in end.items() if addr not in first_event}
    start.update({addr: e["size"] for addr, e in first_event.items() if e["action"] != "alloc"})

    def replay(stop: int | None):
        live = {addr: (size, BEFORE) for addr, size in start.items()}
        total = peak = sum(start.values())
        peak_at, requested = -1, set()
        for i, entry in enumerate(trace[:stop]):
            if entry["action"] == "alloc":
                live[entry["addr"]] = (entry["size"], _owner(entry.get("frames")))
                total += entry["size"]
            elif _frees(entry, requested) and entry["addr"] in live:
                total -= live.pop(entry["addr"])[0]
            if total > peak:
                peak, peak_at = total, i
        return live, peak, peak_at

    _, peak, peak_at = replay(None)
    live, _, _ = replay(peak_at + 1)
    groups = defaultdict(int)
    for size, owner in live.values():
        groups[owner] += size
    ranked = sorted(groups.items(), key=lambda kv: -kv[1])
    shown = [{"owner": owner, "bytes": size, "mib": round(size / 2**20, 1)} for owner, size in ranked[:top]]
    rest = sum(size for _, size in ranked[top:])
    if rest:
        shown.append({"owner": f"{len(ranked) - top} other owners", "bytes": rest, "mib": round(rest / 2**20, 1)})
    return {"status": "pass", "peak_live_bytes": peak, "peak_live_mib": round(peak / 2**20, 1),
            "end_live_bytes": sum(end.values()), "trace_entries": len(trace), "groups": shown}
