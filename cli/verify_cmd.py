"""`flowblend verify`: re-check a pair's exported ONNX graphs against its PyTorch models (exit 1 below threshold)."""
from __future__ import annotations

import sys

from .common import family_of, subscribe


def register(p) -> None:
    subscribe(p, "pair", "artifacts", "device")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export.record import checked_export
    from ..export.verify import THRESHOLDS, verify_export
    from ..families import load_pair

    family = family_of(args)
    checked = checked_export(args.artifacts, family.name)  # a missing or damaged export fails before models load
    pair = load_pair(family.name, args.large, args.small, dtype=checked[1].torch_dtype,
                     allow_download=args.allow_download, export_layout=True)
    reports = verify_export(args.artifacts, pair, device=args.device, checked=checked)
    for report in reports:
        print(report.summary())
    failed = [r.model for r in reports if not r.passed]
    if failed:
        limits = ", ".join(f"{d} >= {t}" for d, t in THRESHOLDS.items())
        print(f"flowblend verify: {', '.join(failed)} failed (min cosine: {limits}; no NaN/Inf); re-export, "
              "e.g. with --dtype fp32 or bf16", file=sys.stderr)
        return 1
    return 0
