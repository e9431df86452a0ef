"""`flowblend export` and `flowblend verify`: ONNX graphs of both transformers, checked against PyTorch."""
from __future__ import annotations

import sys

from flowblend.engines.base import FlowblendError
from flowblend.engines.iospec import IOSpec
from flowblend.export.onnx import EXTERNAL_DATA_THRESHOLD, export_pair, onnx_dir, read_export_record
from flowblend.export.pairs import load_pair
from flowblend.export.verify import verify_onnx

from .common import add_pair_args, add_shape_args, family_of, resolve_spec


def register(sub) -> None:
    p = sub.add_parser("export", help="export both transformers of a pair to ONNX (verified by default)")
    add_pair_args(p)
    add_shape_args(p)
    p.add_argument("--dynamic", default="", help="min/max latent dims for a dynamic profile, e.g. frames=1:9,height=4:8 "
                                                  "(static shapes by default: fastest, required by CUDA graphs)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--external-data-threshold", type=int, default=EXTERNAL_DATA_THRESHOLD,
                   help="weights above this many bytes go to an external .data file (default 2 GiB)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_export)

    v = sub.add_parser("verify", help="re-check exported ONNX graphs against PyTorch (exit 1 below thresholds)")
    add_pair_args(v)
    v.add_argument("--artifacts", default="artifacts")
    v.set_defaults(func=run_verify)


def parse_dynamic(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        try:
            name, rng = part.split("=")
            lo, hi = (int(x) for x in rng.split(":"))
        except ValueError:
            raise FlowblendError(f"--dynamic {part!r} must look like frames=1:9 (latent units)") from None
        out[name.strip()] = (lo, hi)
    return out


def run_export(args) -> int:
    family = family_of(args)
    spec = resolve_spec(args, family, parse_dynamic(args.dynamic))
    from flowblend.cli.backends import parse_dtype

    parse_dtype(args.dtype)
    pair = load_pair(family.name, args.large, args.small, allow_download=args.allow_download)
    record = export_pair(pair, spec, args.artifacts, verify=not args.no_verify,
                         external_data_threshold=args.external_data_threshold, progress=not args.no_progress)
    for name, entry in record["models"].items():
        check = entry.get("verify")
        cos = f", verify min cosine {check['min_cosine']:.7f}" if check else ", not verified"
        print(f"{name}: {onnx_dir(args.artifacts, family.name) / entry['file']} ({entry['bytes'] / 1e6:.1f} MB{cos})")
    print(f"wrote {onnx_dir(args.artifacts, family.name) / 'export.json'}")
    return 0


def run_verify(args) -> int:
    family = family_of(args)
    record = read_export_record(args.artifacts, family.name)
    spec = IOSpec.from_dict(record["spec"])
    pair = load_pair(family.name, args.large, args.small, allow_download=args.allow_download)
    failed = 0
    for name, entry in record["models"].items():
        report = verify_onnx(onnx_dir(args.artifacts, family.name) / entry["file"], pair.transformers[name], spec)
        print(report.summary())
        failed += not report.passed
    if failed:
        print(f"flowblend verify: {failed} graph(s) below threshold; re-export (try --dtype fp32 or bf16)",
              file=sys.stderr)
        return 1
    return 0

