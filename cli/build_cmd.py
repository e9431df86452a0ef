"""`flowblend build`: engines of an exported pair into the per-machine engine store."""
from __future__ import annotations

from pathlib import Path

from ..engines.kinds import BUILT_KINDS, engine_kind
from .common import subscribe


def register(p) -> None:
    # The engine kinds that are built, not every backend; --dtype is accepted for symmetry with export (the
    # precision is the export's).
    subscribe(p, "pair_name", "artifacts", "progress", "backend", "dtype",
              override={"backend": {"default": "onnxruntime", "choices": BUILT_KINDS},
                        "dtype": {"default": None}})
    p.add_argument("--force", action="store_true", help="rebuild even if a matching engine exists")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level (0-5)")
    p.add_argument("--workspace-gib", type=float, default=8.0, help="TensorRT workspace limit")
    p.add_argument("--no-verify", action="store_true",
                   help="TensorRT: store engines without checking them against the FP32 PyTorch models")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engines.build import build_pair_engines

    trt = {}
    if engine_kind(args.backend).keyed_by_gpu:  # TensorRT: built for this GPU, with its own options
        trt = {"opt_level": args.opt_level, "workspace_gib": args.workspace_gib, "phase_progress": not args.no_progress,
               "verify": None if args.no_verify else tensorrt_check(args.artifacts, args.pair)}
    results = build_pair_engines(args.pair, args.backend, args.artifacts, force=args.force,
                                 progress=not args.no_progress, **trt)
    for model, (path, built) in results.items():
        print(f"{model}: {'built' if built else 'reused'} {path}")
    return 0


def tensorrt_check(artifacts: str, pair: str):
    """`verify(onnx_path, plan_path)` for engines/trt_build.py: a plan against the FP32 reference, on the GPU.

    The same seeded inputs, timesteps, metrics and thresholds as `flowblend verify` (export/verify.py),
    at the export shape: the pair is loaded once, from the export's sources, straight into the export
    layout on the GPU (no FP32 copy, no deep copy), and the reference is the FP32 computation of those
    weights (export/precision.py), so memory stays one model plus the engine.
    """
    loaded = {}

    def verify(onnx_path: Path, plan_path: Path):
        import torch

        from ..engines.iospec import IOSpec
        from ..engines.trt_engine import run_plan
        from ..export.record import read_export_record
        from ..export.verify import THRESHOLDS, TIMESTEPS, Comparison, VerifyReport, reference_module
        from ..families import load_pair

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if not loaded:
            record = read_export_record(artifacts, pair)
            # the toy pair records "shipped" rather than a path; real pairs record paths or hub ids
            sources = {k: v for k, v in record.get("sources", {}).items()
                       if pair != "toy" or Path(v).expanduser().exists()}
            dtype = IOSpec.from_dict(record["spec"]).torch_dtype
            loaded.update(record=record, pair=load_pair(pair, sources.get("large"), sources.get("small"), dtype=dtype,
                                                        device=device, export_layout=True))
        record, spec = loaded["record"], IOSpec.from_dict(loaded["record"]["spec"])
        model = next(m for m, e in record["models"].items() if e["file"] == Path(onnx_path).name)
        with reference_module(loaded["pair"].transformers[model]) as (reference, what):
            report = VerifyReport(f"{model} (TensorRT)", spec.dtype, THRESHOLDS[spec.dtype], runner="tensorrt",
                                  graph=f"the plan at the export shape {spec.key()}", reference=what)
            for t in TIMESTEPS:
                inputs = spec.sample_inputs(timestep=t)
                out = run_plan(plan_path, dict(zip(spec.input_names, inputs)))
                with torch.no_grad():
                    ref = reference(*[x.to(device).float() if x.is_floating_point() else x.to(device)
                                      for x in inputs]).float().cpu()
                report.comparisons.append(Comparison.of(t, out.float().cpu().numpy(), ref.numpy(), "opt"))
        return report

    return verify
