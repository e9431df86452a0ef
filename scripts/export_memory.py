"""Peak memory, time and disk of `flowblend export --pair wan` at the real Wan 2.1 widths, per layer.

    python scripts/export_memory.py                      # k = 1 2 layers, fp16, with and without verification
    python scripts/export_memory.py --layers 1 2 3 --out docs/export-memory

Makes random-weight checkpoints at the real widths (14B: 40 heads x 128, FFN 13824; 1.3B: 12 x 128,
FFN 8960) with k layers each, saved with `save_pretrained` (safetensors, FP32 as the published
diffusers checkpoints, in 1 GB shards), then runs the real command, `flowblend export --pair wan --large DIR --small
DIR --dtype fp16` at the family's default video (81 frames, 480x832), in a child process and records
its peak RSS (the child's VmHWM, polled) and wall time, once with `--no-verify` and once with the
default verification. Peak and time are fitted linearly in the pair's export-layout bytes and
extrapolated to the real 40-layer 14B + 30-layer 1.3B pair, whose bytes come from the real configs
built on the meta device. Writes <out>.json and <out>.md from one run.

Memory figures are valid on a shared machine; wall times are upper bounds when other jobs share the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flowblend.bench.report import write_json_and_markdown

GIB = 1024**3
SHARD_SIZE = "1GB"
EXTERNAL_DATA_THRESHOLD = 1 << 20  # bytes; below the default the weights would be serialised in the protobuf
WAN_COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256)
REAL = {"large": dict(WAN_COMMON, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
        "small": dict(WAN_COMMON, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)}


def layout_bytes(config: dict, dtype_name: str = "fp16") -> int:
    """Bytes of a Wan transformer in the export layout (regions in FP16/BF16, islands FP32), from its config."""
    import torch
    from diffusers import WanTransformer3DModel

    from flowblend.export.precision import regions

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = tuple(names[id(child)] + "." for _, _, child in regions(model))
    low = 2 if dtype_name in ("fp16", "bf16") else 4
    return sum(p.numel() * (low if n.startswith(prefixes) else 4) for n, p in model.named_parameters())


def make_checkpoint(config: dict, directory: Path, seed: int) -> None:
    """A random-weight transformer saved as a diffusers checkpoint folder (transformer/ inside)."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config)
    with torch.no_grad():  # zero-initialised layers get weights, so nothing folds away
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    # sharded, as the published 14B checkpoints are (an index json and several files); the export reads
    # tensor by tensor, so the shard size does not change its peak
    model.save_pretrained(directory / "transformer", safe_serialization=True, max_shard_size=SHARD_SIZE)


def _vm_hwm(pid: int) -> int:
    """The process's own peak RSS (VmHWM, bytes); 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure_child(command: list[str]) -> None:
    """Run `command`; print its exit status, wall time and peak RSS as JSON (this process does nothing else).

    Peak RSS is the child's own VmHWM, polled: getrusage's ru_maxrss can carry a parent's high-water
    mark across fork + exec, which on this machine made two different runs report the same figure."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would stall the child
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
        peak = 0
        while child.poll() is None:
            peak = max(peak, _vm_hwm(child.pid))
            time.sleep(0.2)
        log.seek(0)
        stderr = log.read()
    wall = time.perf_counter() - start
    rusage = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"rc": child.returncode, "wall_s": wall, "peak_rss": peak, "ru_maxrss": rusage,
                      "stderr": stderr[-2000:]}))


def run_export(large: Path, small: Path, artifacts: Path, dtype: str, verify: bool) -> dict:
    command = [sys.executable, "-m", "flowblend.cli.main", "export", "--pair", "wan", "--large", str(large),
               "--small", str(small), "--dtype", dtype, "--artifacts", str(artifacts), "--no-progress",
               # the real 14B (27 GiB) is far above the 2 GiB default: k-layer stand-ins take the same path
               "--external-data-threshold", str(EXTERNAL_DATA_THRESHOLD)]
    if not verify:
        command.append("--no-verify")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run([sys.executable, __file__, "--measure-child", "--", *command], capture_output=True,
                         text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"export failed (exit {result['rc']}): {result['stderr']}")
    record = json.loads((artifacts / "wan" / "onnx" / "export.json").read_text())
    result["disk"] = {m: sum(f["bytes"] for f in e["files"].values()) for m, e in record["models"].items()}
    result["verify"] = {m: (e["verify"] or {}).get("min_cosine") for m, e in record["models"].items()}
    result.pop("stderr")
    return result


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope); one point gives slope y/x through the origin."""
    if len(set(xs)) < 2:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--out", default="docs/export-memory")
    p.add_argument("--workdir", default=None, help="where checkpoints and exports go (default: a temp dir)")
    p.add_argument("--skip-verify-run", action="store_true", help="only the --no-verify export")
    args = p.parse_args(argv)

    rows, load_start = [], os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="export-memory.", dir=args.workdir))
    try:
        for k in args.layers:
            configs = {name: dict(cfg, num_layers=k) for name, cfg in REAL.items()}
            dirs = {name: work / f"wan-{name}-{k}" for name in configs}
            for i, (name, cfg) in enumerate(configs.items()):
                make_checkpoint(cfg, dirs[name], seed=i)
            row = {"layers": k, "bytes": {n: layout_bytes(c, args.dtype) for n, c in configs.items()}}
            for verify in ([False] if args.skip_verify_run else [False, True]):
                artifacts = work / f"artifacts-{k}-{int(verify)}"
                mode = "verify" if verify else "no_verify"
                row[mode] = run_export(dirs["large"], dirs["small"], artifacts, args.dtype, verify)
                print(json.dumps({"layers": k, mode: row[mode]}), flush=True)
                shutil.rmtree(artifacts)
            for d in dirs.values():
                shutil.rmtree(d)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = summarise(rows, args.dtype)
    report["load_average"] = [load_start, os.getloadavg()[0]]
    write_json_and_markdown(args.out, report, markdown(report))
    print(markdown(report))
    return 0


def summarise(rows: list[dict], dtype: str) -> dict:
    real = {n: layout_bytes(c, dtype) for n, c in REAL.items()}
    report = {"dtype": dtype, "rows": rows, "real_bytes": real, "machine": platform.platform(),
              "cpus": os.cpu_count(), "extrapolated": {}}
    pair = [sum(r["bytes"].values()) for r in rows]
    for mode in ("no_verify", "verify"):
        if not all(mode in r for r in rows):
            continue
        a, b = fit(pair, [r[mode]["peak_rss"] for r in rows])
        ta, tb = fit(pair, [r[mode]["wall_s"] for r in rows])
        limit = (1.5 if mode == "no_verify" else 3.0) * real["large"] + GIB
        peak = a + b * sum(real.values())
        report["extrapolated"][mode] = {"peak_rss": peak, "wall_s": ta + tb * sum(real.values()), "target": limit,
                                        "meets_target": peak <= limit}
    disk_per_byte = [sum(r["no_verify"]["disk"].values()) / sum(r["bytes"].values()) for r in rows]
    report["extrapolated"]["disk"] = {n: real[n] * max(disk_per_byte) for n in real}
    return report


def markdown(report: dict) -> str:
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    lines = [f"# `flowblend export --pair wan --dtype {report['dtype']}` at the real Wan 2.1 widths",
             "",
             "Made by `python scripts/export_memory.py` (random weights, k layers per model, saved with "
             "`save_pretrained` in 1 GB shards; the real CLI in a child process; peak RSS: the child's VmHWM). Peak "
             "memory does not depend on other jobs; wall times do (upper bounds when the CPU is shared)"
             + (f"; load average {report['load_average'][0]:.2f} at the start, {report['load_average'][1]:.2f} at the "
                "end." if report.get("load_average") else "."),
             "",
             "| layers (large, small) | large layout bytes | pair bytes | mode | peak RSS | peak / large | target "
             "| met | wall | disk (large + small) | min cosine |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        large, pair = r["bytes"]["large"], sum(r["bytes"].values())
        for mode in ("no_verify", "verify"):
            if mode not in r:
                continue
            m = r[mode]
            limit = (1.5 if mode == "no_verify" else 3.0) * large + GIB
            cos = ", ".join(f"{k} {v:.6f}" for k, v in m["verify"].items() if v is not None) or "-"
            lines.append(f"| {r['layers']} | {g(large)} | {g(pair)} | {mode.replace('_', '-')} | {g(m['peak_rss'])} "
                         f"| {m['peak_rss'] / large:.2f}x | {g(limit)} | {'yes' if m['peak_rss'] <= limit else 'NO'} "
                         f"| {m['wall_s']:.0f} s | {g(sum(m['disk'].values()))} | {cos} |")
    real, ex = report["real_bytes"], report["extrapolated"]
    lines += ["", f"Extrapolated (linear in the pair's layout bytes) to Wan 2.1 14B (40 layers, {g(real['large'])}) "
              f"+ 1.3B (30 layers, {g(real['small'])}):", "",
              "| mode | peak RSS | target | met | wall (upper bound) |", "|---|---|---|---|---|"]
    for mode in ("no_verify", "verify"):
        if mode in ex:
            e = ex[mode]
            lines.append(f"| {mode.replace('_', '-')} | {g(e['peak_rss'])} | {g(e['target'])} | "
                         f"{'yes' if e['meets_target'] else 'NO'} | {e['wall_s'] / 60:.0f} min |")
    lines += ["", f"Disk: large {g(ex['disk']['large'])}, small {g(ex['disk']['small'])} (graph + .data); "
              "verification adds only a small twin graph that reads the written .data.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--measure-child":
        measure_child(sys.argv[3:])
        sys.exit(0)
    sys.exit(main())
