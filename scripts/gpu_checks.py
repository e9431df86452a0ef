"""Device checks of the compiled path (issue #4) at the real Wan 2.1 sizes, as one report.

    python scripts/gpu_checks.py --out docs/gpu-runs/h100-checks        # on a CUDA machine
    python scripts/gpu_checks.py --out /tmp/checks --quick               # smaller sizes; on CPU only what runs there

Each check compares against an independent reference and reports PASS / FAIL / SKIPPED (with the
reason), its numbers and how long it took; writes gpu-checks.json and gpu-checks.md into --out.

- kernels: CMake + nvcc build of csrc/ into ./build (where runtime/fused.py looks), exported symbols
- fused host/device parity: the fused step vs the PyTorch step over a 50-step UniPC/Euler run at a
  Wan latent (480x832, 81 frames: 16 x 21 x 60 x 104, CFG), fp32/fp16/bf16 velocity, and per-step time
- graphs: random-weight WanTransformer3DModel at the 14B (large) and 1.3B (small) block widths with
  --layers blocks each, FP32: whole-loop and per-step graph replays vs the eager loop, loop times
- fp16/bf16 vs fp32 at both widths: cosine, max error, NaN/Inf (FP32 islands as export/onnx.py keeps)
- tensorrt: the small-width model exported to ONNX (fp16), built, checked against FP32 PyTorch, its
  loop eager vs whole graph, timings, and the device memory its engines take (weights, by
  cudaMemGetInfo around deserialization; the one shared activation block)
- memory: the GPU memory a blended TensorRT run needs, part by part: engine weights + one activation
  block (from the tensorrt check) + the sampler's buffers + text encoder + VAE (the Wan 2.1 VAE's
  config with random weights on the GPU, and its decode peak; UMT5-XXL's weights counted from its
  config on the meta device). A check whose Python dependency is missing is SKIPPED with its name.
Random weights: speed and numerical behaviour of the kernels do not depend on trained values; the
block sizes are the published ones, the depth is --layers (reported, never extrapolated).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from flowblend.engines.torch_engine import TorchEngine
from flowblend.runtime import fused
from flowblend.runtime.graph import GraphRunner
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions

ROOT = Path(__file__).resolve().parents[1]
torch.backends.cudnn.allow_tf32 = False  # FP32 references really FP32 (Wan patchifies with a Conv3d)
torch.backends.cuda.matmul.allow_tf32 = False
WAN = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256)
WIDTHS = {"large": dict(WAN, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824),   # Wan 2.1 14B
          "small": dict(WAN, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960)}    # Wan 2.1 1.3B


class Skip(Exception):
    """A check that cannot run on this machine; the message says why."""


MEASURED: dict = {}  # what one check measured for a later one (the tensorrt check's engine memory)
UMT5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=256384,
                feed_forward_proj="gated-gelu")  # google/umt5-xxl, Wan 2.1's text encoder


def need_cuda():
    if not torch.cuda.is_available():
        raise Skip("no CUDA GPU (torch.cuda.is_available() is False)")


def cuda_ms(fn, reps: int) -> float:
    """Median wall time of fn() in milliseconds, measured with CUDA events after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def compare(a, b) -> dict:
    a, b = a.double().flatten(), b.double().flatten()
    return {"cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
            "max_abs": (a - b).abs().max().item(), "nonfinite": int((~torch.isfinite(a)).sum())}


# -- checks ------------------------------------------------------------------------------------
def check_kernel_build(args) -> dict:
    if not (shutil.which("nvcc") and shutil.which("cmake")):
        raise Skip("nvcc and cmake are needed to build csrc/")
    build = ROOT / "build"
    # A bare `-j` lets make start every job at once; on a loaded 2-core machine that starves the rest.
    jobs = str(max(1, min(os.cpu_count() or 1, 16)))
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                ["cmake", "--build", str(build), "-j", jobs]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return {"status": "fail", "command": " ".join(cmd), "log": (done.stdout + done.stderr)[-2000:]}
    lib = build / fused.LIBRARY_NAME
    nm = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    symbols = sorted(line.split()[-1] for line in nm.splitlines() if " T " in line)
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    want = ["flowblend_abi_version", "flowblend_error_string", "flowblend_fused_step", "flowblend_fused_step_host"]
    return {"status": "pass" if symbols == want else "fail", "library": str(lib), "symbols": symbols, "nvcc": nvcc}


class ScaleEngine:
    """velocity = row scale * model input (rows of one sign within 2x: cond - uncond exact in any dtype)."""

    input_names, output_names = ("latents", "timestep", "text_embeds"), ("velocity",)

    def __init__(self, device="cpu", dtype=torch.float32):
        self.device, self.dtype = torch.device(device), dtype

    def bind(self, tensors):
        self.inp, self.out = tensors["latents"], tensors["velocity"]
        self.scale = torch.tensor([0.6, 0.45][: self.out.shape[0]], device=self.out.device).view(-1, 1, 1, 1, 1)

    def run(self, step):
        self.out.copy_(self.inp.float() * (self.scale + 0.01 * step))


def _fused_run(lib, device, shape, dtype, solver, steps, kernel: bool, host: bool):
    plan = BlendPlan.parse("LSL:0.4,0.2", steps)
    engines = {"large": ScaleEngine(device, dtype), "small": ScaleEngine(device, dtype)}
    opts = SamplerOptions(solver=solver, guidance_scale=5.0, fused_kernel=False)
    sampler = Sampler(engines, plan, opts)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 8, 16, generator=g)
    bufs = sampler.load_request(torch.randn((1, *shape), generator=g), text, text)
    fs = fused.FusedSteps(lib, bufs, sampler.table, 5.0, host=host) if kernel else None
    for i, name in enumerate(plan.models):
        if fs is None:
            sampler.step(i)
        else:
            engines[name].run(i)
            fs.step(i)
    return sampler, bufs.latents.clone(), fs


def check_fused(args, host: bool) -> dict:
    if not host:
        need_cuda()
    # the library the kernels check built in this checkout, before any that the installed flowblend finds
    built = ROOT / "build" / fused.LIBRARY_NAME
    lib = fused.load_library(built if built.is_file() else None)
    if lib is None:
        raise Skip("the kernel library is not built (the kernels check builds it)")
    device = "cpu" if host else "cuda"
    shape = (16, 3, 8, 12) if host or args.quick else (16, 21, 60, 104)
    steps = 8 if host else 50
    out = {"latent": list(shape), "steps": steps, "results": []}
    worst = 0.0
    for solver in ("unipc", "euler"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            _, ref, _ = _fused_run(lib, device, shape, dtype, solver, steps, kernel=False, host=host)
            sampler, got, fs = _fused_run(lib, device, shape, dtype, solver, steps, kernel=True, host=host)
            row = {"solver": solver, "dtype": str(dtype).split(".")[-1], "rel_err": rel(got, ref)}
            if not host:  # per-step update time: PyTorch ops (guide + combines + cast) vs the one kernel
                i = steps // 2
                row["torch_step_us"] = 1e3 * cuda_ms(lambda: (sampler.evaluate(i), sampler.advance(i)), args.reps * 10)
                row["fused_step_us"] = 1e3 * cuda_ms(lambda: fs.step(i), args.reps * 10)
            worst = max(worst, row["rel_err"] / (1e-6 if dtype == torch.float32 else 1e-5))
            out["results"].append(row)
    out["status"] = "pass" if worst <= 1.0 else "fail"
    out["tolerance"] = "rel. err <= 1e-6 (fp32 velocity), 1e-5 (fp16/bf16)"
    return out


def random_wan(width: str, layers: int, device, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**WIDTHS[width], num_layers=layers).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def video_shape(args):
    # latents of a 480x832 clip: 17 frames -> 5 latent frames (or 9 -> 3 with --quick)
    return (16, 3, 30, 52) if args.quick else (16, 5, 60, 104)


def check_graphs(args) -> dict:
    need_cuda()
    models = {n: random_wan(n, args.layers, "cuda", seed=i) for i, n in enumerate(("large", "small"))}
    engines = {n: TorchEngine(m, name=n) for n, m in models.items()}
    plan = BlendPlan.parse("LSL:0.4,0.2", args.steps)
    opts = SamplerOptions(solver="unipc", shift=3.0, guidance_scale=5.0, fused_kernel=False)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((1, *video_shape(args)), generator=g)
    text = [torch.randn(1, 512, 4096, generator=g).cuda() for _ in range(2)]
    eager = Sampler(engines, plan, options=opts, device="cuda")
    reference = eager.sample(noise, *text)
    out = {"layers": args.layers, "latent": list(noise.shape[1:]), "steps": args.steps, "plan": plan.label}
    eager.load_request(noise, *text)
    out["eager_loop_ms"] = cuda_ms(eager.run_loop, args.reps)
    ok = True
    for mode in ("per_step", "whole"):
        runner = GraphRunner(Sampler(engines, plan, options=opts, device="cuda"), mode=mode)
        start = time.perf_counter()
        first = runner.sample(noise, *text)
        out[f"{mode}_first_call_s"] = time.perf_counter() - start  # warm-up + capture + replay
        out[f"{mode}_rel_err"] = rel(first, reference)
        out[f"{mode}_loop_ms"] = cuda_ms(runner.replay, args.reps)
        ok &= out[f"{mode}_rel_err"] <= 1e-5
    out["status"] = "pass" if ok else "fail"
    out["tolerance"] = "graph replay vs eager loop, FP32: rel. err <= 1e-5"
    return out


def check_precision(args) -> dict:
    need_cuda()
    from flowblend.export.onnx import cast_for_export

    g = torch.Generator().manual_seed(1)
    shape = video_shape(args)
    latents = torch.randn((2, *shape), generator=g).cuda()
    text = torch.randn(2, 512, 4096, generator=g).cuda()
    out, ok = {"layers": args.layers, "latent": list(shape), "results": []}, True
    for width in ("small", "large"):
        model = random_wan(width, args.layers, "cuda", seed=3)
        outputs = {}
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
            engine = TorchEngine(model if dtype == torch.float32 else cast_for_export(copy.deepcopy(model), dtype))
            for t in (999.0, 500.0, 50.0):
                bufs = {"latents": latents.to(dtype), "timestep": torch.full((1, 2), t, device="cuda"),
                        "text_embeds": text.to(dtype), "velocity": torch.empty_like(latents, dtype=dtype)}
                engine.bind(bufs)
                engine.run(0)
                outputs[name, t] = bufs["velocity"].float()
            del engine
        for name in ("fp16", "bf16"):
            for t in (999.0, 500.0, 50.0):
                row = {"width": width, "dtype": name, "timestep": t, **compare(outputs[name, t], outputs["fp32", t])}
                ok &= row["cosine"] >= 0.999 and row["nonfinite"] == 0
                out["results"].append(row)
        del model, outputs
        torch.cuda.empty_cache()
    out["status"] = "pass" if ok else "fail"
    out["tolerance"] = "cosine >= 0.999 vs FP32, no NaN/Inf"
    return out


def check_tensorrt(args) -> dict:
    need_cuda()
    try:
        import tensorrt
    except ImportError as exc:
        raise Skip(f"TensorRT is not installed ({exc})") from None
    from flowblend.engines.iospec import IOSpec
    from flowblend.engines.signature import signature_for
    from flowblend.engines.trt_build import build_plan_bytes, build_settings
    from flowblend.engines.trt_engine import TrtEngine, run_plan, share_activation_memory
    from flowblend.export.onnx import export_transformer

    shape = video_shape(args)
    spec = IOSpec(batch=2, latent=shape, text_len=512, text_dim=4096, dtype="fp16")
    out = {"tensorrt": tensorrt.__version__, "layers": args.layers, "latent": list(shape)}
    models = {n: random_wan(n, args.layers, "cpu", seed=i) for i, n in enumerate(("large", "small"))}
    plans = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            start = time.perf_counter()
            export_transformer(model, spec, Path(tmp) / f"{name}.onnx")
            out[f"{name}_export_s"] = time.perf_counter() - start
            start = time.perf_counter()
            plans[name] = build_plan_bytes(Path(tmp) / f"{name}.onnx", build_settings(spec, opt_level=3),
                                           timing_cache=Path(tmp) / "timing.cache", progress=False)
            out[f"{name}_build_s"] = time.perf_counter() - start
    inputs = spec.sample_inputs(timestep=500.0)
    with torch.no_grad():
        ref = signature_for(models["small"].cuda())(*[x.float().cuda() for x in inputs]).cpu()
    out["small_vs_fp32_pytorch"] = compare(run_plan(plans["small"], dict(zip(spec.input_names, inputs))), ref)
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    engines = {n: TrtEngine(p, name=n) for n, p in plans.items()}
    torch.cuda.synchronize()
    out["engine_weights_bytes"] = free_before - torch.cuda.mem_get_info()[0]  # TensorRT allocates them, not torch
    block = share_activation_memory(engines)
    out["activation_block_bytes"] = block.numel()
    out["activation_bytes_per_engine"] = {n: e.activation_bytes for n, e in engines.items()}
    MEASURED.update(engine_weights_bytes=out["engine_weights_bytes"], activation_block_bytes=block.numel(),
                    engine_layers=args.layers)
    plan = BlendPlan.parse("LSL:0.4,0.2", args.steps)
    opts = SamplerOptions(guidance_scale=5.0, fused_kernel=False)
    g = torch.Generator().manual_seed(0)
    noise, text = torch.randn((1, *shape), generator=g), [torch.randn(1, 512, 4096, generator=g) for _ in range(2)]
    eager = Sampler(engines, plan, options=opts)
    reference = eager.sample(noise, *text)
    eager.load_request(noise, *text)
    out["eager_loop_ms"] = cuda_ms(eager.run_loop, args.reps)
    runner = GraphRunner(Sampler(engines, plan, options=opts), mode="whole")
    out["whole_rel_err"] = rel(runner.sample(noise, *text), reference)
    out["whole_loop_ms"] = cuda_ms(runner.replay, args.reps)
    cos = out["small_vs_fp32_pytorch"]
    out["status"] = "pass" if cos["cosine"] >= 0.999 and cos["nonfinite"] == 0 and out["whole_rel_err"] <= 1e-5 \
        else "fail"
    return out


def check_memory(args) -> dict:
    need_cuda()
    from flowblend.runtime.buffers import SamplerBuffers

    shape = video_shape(args)
    out = {"latent": list(shape), "parts": {}}
    bufs = SamplerBuffers.allocate(shape, (512, 4096), [999.0] * args.steps, True, torch.float16, torch.device("cuda"),
                                   state_names=("last_sample", "x0_0", "x0_1", "x0_2"))  # UniPC's
    out["parts"]["sampler_buffers"] = sum(t.numel() * t.element_size() for t in
                                          {id(t): t for t in (bufs.latents, bufs.model_input, bufs.velocity,
                                                              bufs.text_embeds, bufs.timestep_table, bufs.guided,
                                                              *bufs.state.values())}.values())
    del bufs
    if MEASURED:
        out["parts"]["engine_weights"] = MEASURED["engine_weights_bytes"]
        out["parts"]["activation_block"] = MEASURED["activation_block_bytes"]
        out["engine_layers"] = MEASURED["engine_layers"]
    else:
        out["engines"] = "not measured: the tensorrt check did not run here (TensorRT missing or --only)"
    from diffusers import AutoencoderKLWan

    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    vae = AutoencoderKLWan().to("cuda", torch.float16).eval()  # diffusers' defaults are the Wan 2.1 VAE's config
    out["parts"]["vae_weights"] = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        vae.decode(torch.randn((1, *shape), device="cuda", dtype=torch.float16))
    out["vae_decode_peak_bytes"] = torch.cuda.max_memory_allocated() - base
    del vae
    torch.cuda.empty_cache()
    try:
        from transformers import UMT5Config, UMT5EncoderModel

        with torch.device("meta"):
            encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
        out["parts"]["text_encoder_weights_fp16"] = 2 * sum(p.numel() for p in encoder.parameters())
        out["text_encoder"] = "UMT5-XXL weights counted from its config (meta device), bf16/fp16"
    except ImportError as exc:
        out["text_encoder"] = f"not counted: {exc}"
    out["total_bytes"] = sum(out["parts"].values())
    out["status"] = "pass"
    out["note"] = ("engine weights are for the --layers depth built by the tensorrt check; the sum is a floor for that "
                   "depth plus the VAE decode peak above its weights")
    return out


CHECKS = {"kernels": check_kernel_build, "fused_host": lambda a: check_fused(a, host=True),
          "fused_device": lambda a: check_fused(a, host=False), "graphs": check_graphs,
          "precision": check_precision, "tensorrt": check_tensorrt, "memory": check_memory}


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def markdown(report: dict) -> str:
    lines = ["# flowblend GPU checks", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["environment"].items()]
    lines += ["", "| check | status | seconds | details |", "|---|---|---|---|"]
    for name, r in report["checks"].items():
        details = {k: v for k, v in r.items() if k not in ("status", "seconds", "results", "traceback")}
        lines.append(f"| {name} | {r['status'].upper()} | {r.get('seconds', 0):.1f} | `{json.dumps(details)}` |")
    for name, r in report["checks"].items():
        if r.get("results"):
            keys = list(r["results"][0])
            lines += ["", f"## {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys)
                      + " |" for row in r["results"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu-checks.json and gpu-checks.md")
    p.add_argument("--only", action="append", choices=list(CHECKS), help="run only these checks (repeatable)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks per model (full width)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps of the loop checks")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--quick", action="store_true", help="smaller latents: a fast run")
    args = p.parse_args(argv)
    report = {"environment": environment(), "checks": {}}
    for name in args.only or CHECKS:
        start = time.perf_counter()
        try:
            result = CHECKS[name](args)
        except Skip as why:
            result = {"status": "skipped", "reason": str(why)}
        except ModuleNotFoundError as exc:  # the machine lacks a dependency (not flowblend itself): say which
            if (exc.name or "").split(".")[0] == "flowblend":
                raise
            result = {"status": "skipped", "reason": f"python package {exc.name!r} is not installed: install the "
                                                     "copied wheels (scripts/gpu_run.py does)"}
        except Exception as exc:  # noqa: BLE001 - a crashed check is a failed check, the report goes on
            result = {"status": "fail", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        result["seconds"] = time.perf_counter() - start
        report["checks"][name] = result
        print(f"{name}: {result['status'].upper()} ({result['seconds']:.1f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-checks.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu-checks.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if any(r["status"] == "fail" for r in report["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
