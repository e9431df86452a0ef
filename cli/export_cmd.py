"""`flowblend export`: both transformers of a pair to ONNX, verified against PyTorch before they land."""
from __future__ import annotations

from flowblend.errors import FlowblendError

from ..resolve.blend_request import guidance_of, video_of
from .common import choices_of, family_of, subscribe

DYNAMIC_DIMS = ("frames", "height", "width")


def register(p) -> None:
    subscribe(p, "pair", "video", "guidance", "dtype", "artifacts", "progress")
    p.add_argument("--dynamic", default="",
                   help="min:max latent dims for a dynamic profile, e.g. frames=1:9,height=4:8 (default: static "
                        "shapes, the fastest and what CUDA graphs need)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--external-data-threshold", type=int,
                   help="weights of this many bytes or more go to an external .data file (default: 2 GiB, ONNX's "
                        "protobuf limit)")
    p.set_defaults(func=run)


def parse_dynamic(text: str) -> dict:
    """'frames=1:9,height=4:8' -> {"frames": (1, 9), "height": (4, 8)} (latent units)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            name, bounds = part.split("=")
            lo, hi = (int(x) for x in bounds.split(":"))
        except ValueError:
            raise FlowblendError(f"--dynamic {part!r} must look like frames=1:9 (min:max in latent units)") from None
        if name.strip() not in DYNAMIC_DIMS:
            raise FlowblendError(f"--dynamic {name.strip()!r}: only {', '.join(DYNAMIC_DIMS)} can be dynamic")
        out[name.strip()] = (lo, hi)
    return out


def run(args) -> int:
    family = family_of(args)
    if args.external_data_threshold is not None and args.external_data_threshold <= 0:
        raise FlowblendError("--external-data-threshold must be a positive byte count, got "
                             f"{args.external_data_threshold}")
    dynamic = parse_dynamic(args.dynamic)
    frames, height, width = video_of(choices_of(args), family)

    from ..export.onnx import EXTERNAL_DATA_THRESHOLD, export_pair
    from ..export.record import EXPORT_RECORD, onnx_dir
    from ..families import load_pair

    spec = family.io_spec(family.latent_shape(frames, height, width), guidance_of(choices_of(args), family), args.dtype, dynamic)
    pair = load_pair(family.name, args.large, args.small, dtype=spec.torch_dtype, allow_download=args.allow_download,
                     export_layout=True)
    threshold = args.external_data_threshold or EXTERNAL_DATA_THRESHOLD
    record = export_pair(pair, spec, args.artifacts, verify=not args.no_verify,
                         external_data_threshold=threshold, progress=not args.no_progress, release_models=True)
    out = onnx_dir(args.artifacts, family.name)
    for name, entry in record["models"].items():
        check = entry["verify"]
        verdict = (f"verified: min cosine {check['min_cosine']:.7f}, max abs err {check['max_abs']:.2e}"
                   if check else "NOT verified (--no-verify)")
        data = " + external data" if entry["external_data"] else ""
        print(f"{name}: {out / entry['file']}{data} ({entry['bytes'] / 1e6:.1f} MB, {spec.dtype}, {verdict})")
    print(f"wrote {out / EXPORT_RECORD}; next: flowblend build --pair {family.name} --backend onnxruntime")
    return 0
