"""Verification figures of every exported model and dtype, and ONNX Runtime vs PyTorch on the toy pair.

    python scripts/export_figures.py            # writes docs/export-verification.md (+ .json)

Exports the shipped toy pair and tiny random Wan 2.1 / LTX-Video pairs (the real diffusers classes)
in FP32, FP16 and BF16 with the same code `flowblend export` runs, and records what verification
measured against the FP32 PyTorch module (ONNX Runtime on the CPU; BF16 through onnx's reference
evaluator, since ORT's CPU provider has no BF16 kernels). Then runs the toy pair's blended loop
(LSL:0.4,0.2) over OrtEngines built from the FP32 export and over TorchEngines, and reports the
relative error of the final latents and the PSNR of the decoded videos, as issue #3 asks.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from flowblend.engines.iospec import IOSpec
from flowblend.engines.ort_engine import OrtEngine
from flowblend.engines.torch_engine import TorchEngine
from flowblend.export.onnx import export_pair
from flowblend.export.record import onnx_dir
from flowblend.families import LoadedPair, get_family, load_pair
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions

DTYPES = ("fp32", "fp16", "bf16")


def tiny(family: str) -> LoadedPair:
    from flowblend.bench.tiny import tiny_pair

    return LoadedPair(get_family(family), tiny_pair(family), encode_prompt=None, decode=None,
                      sources={m: f"tiny random {family} ({m})" for m in ("large", "small")})


def tiny_spec(family: str, dtype: str) -> IOSpec:
    from flowblend.bench.tiny import TEXT, latent_shape

    return IOSpec(batch=2, latent=latent_shape(family), text_len=TEXT[0], text_dim=TEXT[1], dtype=dtype,
                  with_mask=family == "ltx")


def toy_spec(dtype: str) -> IOSpec:
    f = get_family("toy")
    return IOSpec(batch=2, latent=f.latent_shape(f.frames, f.height, f.width), text_len=f.text_len,
                  text_dim=f.text_dim, dtype=dtype, patch=tuple(f.patch))


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 2.0) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def ort_vs_torch(pair: LoadedPair, artifacts: Path, steps: int = 20, seed: int = 0) -> dict:
    family = pair.family
    shape = family.latent_shape(family.frames, family.height, family.width)
    plan = BlendPlan.parse("LSL:0.4,0.2", steps)
    embeds, _ = pair.encode_prompt(["a red circle moving left", ""])
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
    out = {}
    for backend in ("torch", "onnxruntime"):
        if backend == "torch":
            engines = {m: TorchEngine(t, name=m) for m, t in pair.transformers.items()}
        else:
            engines = {m: OrtEngine(onnx_dir(artifacts, family.name) / f"{m}.onnx", name=m) for m in pair.transformers}
        sampler = Sampler(engines, plan, SamplerOptions(guidance_scale=family.guidance, **family.sampler_kwargs(shape)))
        out[backend] = sampler.sample(noise, embeds[0:1], embeds[1:2]).clone()
    a, b = out["torch"], out["onnxruntime"]
    return {"plan": plan.label, "steps": steps, "latent_rel_err": float((a - b).norm() / a.norm()),
            "latent_max_abs": float((a - b).abs().max()),
            "video_psnr_db": psnr(pair.decode(a), pair.decode(b))}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/export-verification")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows, chain = [], None
    toy = load_pair("toy")
    with tempfile.TemporaryDirectory() as tmp:
        for name, pair, spec_of in (("toy", toy, toy_spec), ("wan (tiny random)", tiny("wan"), lambda d: tiny_spec("wan", d)),
                                    ("ltx (tiny random)", tiny("ltx"), lambda d: tiny_spec("ltx", d))):
            for dtype in DTYPES:
                root = Path(tmp) / f"{pair.family.name}-{dtype}"
                record = export_pair(pair, spec_of(dtype), root, progress=False)
                for model, entry in record["models"].items():
                    v = entry["verify"]
                    worst_rel = max(c["max_rel"] for c in v["comparisons"])
                    nonfinite = sum(c["nonfinite"] for c in v["comparisons"])
                    rows.append({"pair": name, "model": model, "dtype": dtype, "runner": v["runner"],
                                 "min_cosine": v["min_cosine"], "max_abs": v["max_abs"], "max_rel": worst_rel,
                                 "nonfinite": nonfinite, "threshold": v["threshold"], "passed": v["passed"],
                                 "timesteps": sorted({c["timestep"] for c in v["comparisons"]}),
                                 "fp32_islands": len(entry["fp32_islands"]), "mb": entry["bytes"] / 1e6})
                if name == "toy" and dtype == "fp32":
                    chain = ort_vs_torch(toy, root)
    record = {"rows": rows, "toy_ort_vs_torch": chain, "wall_s": time.time() - t0,
              "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"}
    lines = ["# Export verification figures", "",
             f"Generated by `python scripts/export_figures.py` ({record['wall_s']:.0f} s, {record['machine']}). "
             "Do not edit by hand.", "",
             "Each exported graph against the FP32 PyTorch module on the same seeded inputs at each timestep "
             "(`export/verify.py`, as `flowblend export` runs it). Thresholds: FP32 cosine >= 0.99999; FP16/BF16 "
             "cosine >= 0.999 and no NaN/Inf. FP16/BF16 graphs keep FP32 islands as explicit casts "
             "(column: modules kept in FP32).", "",
             "| pair | model | dtype | runner | min cosine | max abs err | max rel err | NaN/Inf | FP32 islands | "
             "MB | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pair']} | {r['model']} | {r['dtype']} | {r['runner']} | {r['min_cosine']:.7f} | "
                     f"{r['max_abs']:.2e} | {r['max_rel']:.2e} | {r['nonfinite']} | {r['fp32_islands']} | "
                     f"{r['mb']:.2f} | {'PASS' if r['passed'] else 'FAIL'} (>= {r['threshold']}) |")
    c = chain
    lines += ["", "## Toy pair: blended loop over ONNX Runtime vs PyTorch", "",
              f"Plan {c['plan']} ({c['steps']} steps), CFG, FP32 graphs run by ONNX Runtime's CPU provider through "
              "OrtEngine vs the same weights through TorchEngine, same noise:", "",
              f"- final latents: relative error {c['latent_rel_err']:.2e} (limit 1e-4), max abs error "
              f"{c['latent_max_abs']:.2e}",
              f"- decoded video PSNR {c['video_psnr_db']:.1f} dB (limit 40 dB)", ""]
    out = Path(args.out)
    for suffix, text in ((".json", json.dumps(record, indent=2)), (".md", "\n".join(lines))):
        tmp = out.with_name(f".{out.name}{suffix}.partial")
        tmp.write_text(text)
        os.replace(tmp, out.with_suffix(suffix))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
