"""What keeping the residual stream, norms and modulation in FP32 costs an FP16 graph: ops and bytes per step.

    python scripts/fp32_residual_cost.py --out docs/fp32-residual-cost     # writes .json and .md

Exports a tiny random Wan (the real diffusers class, 4 blocks) two ways at one shape: ours
(export/precision.py: FP16 matmuls and attention, FP32 between them) and a plain whole-model FP16
cast (diffusers' own islands only, the residual stored in FP16). Counts the nodes by type (Casts
above all) and, from ONNX shape inference, the bytes every node writes into tensors of the hidden
width (the residual stream and what is computed from it), per block and per element of the
[batch, tokens, width] stream. Those per-element figures are then scaled to Wan 2.1 14B and 1.3B at
81 frames 480x832 with CFG (batch 2, 32760 tokens): the extra activation bytes a step writes before
any fusion (an upper bound: TensorRT fuses elementwise chains and Casts into neighbouring kernels).
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import TEXT, WAN_TINY  # noqa: E402

from flowblend.bench.report import write_json_and_markdown
from flowblend.engines.iospec import IOSpec  # noqa: E402
from flowblend.engines.signature import signature_for  # noqa: E402
from flowblend.export.onnx import cast_for_export, export_transformer  # noqa: E402

BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2}
REAL = {"14B": {"width": 5120, "layers": 40}, "1.3B": {"width": 1536, "layers": 30}}
REAL_TOKENS, REAL_BATCH = 21 * 30 * 52, 2
LAYERS = 4


def plain_export(model, spec, path):
    module = signature_for(cast_for_export(copy.deepcopy(model), torch.float16)).eval()
    with torch.no_grad():
        torch.onnx.export(module, spec.sample_inputs(), str(path), dynamo=True, opset_version=18,
                          input_names=list(spec.input_names), output_names=["velocity"], verbose=False)
    return path


def graph_costs(path: Path, batch: int, tokens: int, width: int) -> dict:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    info = {v.name: v.type.tensor_type for v in (*model.graph.value_info, *model.graph.output)}
    stream_bytes = 0
    for node in model.graph.node:
        for out in node.output:
            t = info.get(out)
            dims = [d.dim_value for d in t.shape.dim] if t is not None else []
            if dims and dims[-1] == width and tokens in dims and batch in dims:  # a [B, N, width]-sized tensor
                stream_bytes += BYTES.get(t.elem_type, 0) * batch * tokens * width
    ops = Counter(n.op_type for n in model.graph.node)
    return {"nodes": sum(ops.values()), "casts": ops.get("Cast", 0), "ops": dict(ops),
            "stream_bytes_per_element": stream_bytes / (batch * tokens * width)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/fp32-residual-cost")
    args = p.parse_args(argv)
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    config = dict(WAN_TINY["large"], num_layers=LAYERS)
    model = WanTransformer3DModel(**config).eval()
    latent = (4, 2, 4, 4)
    spec = IOSpec(batch=2, latent=latent, text_len=TEXT[0], text_dim=TEXT[1], dtype="fp16")
    tokens = latent[1] * latent[2] // 2 * latent[3] // 2
    width = config["num_attention_heads"] * config["attention_head_dim"]
    with tempfile.TemporaryDirectory() as tmp:
        ours = graph_costs(export_transformer(model, spec, Path(tmp) / "ours.onnx"), 2, tokens, width)
        plain = graph_costs(plain_export(model, spec, Path(tmp) / "plain.onnx"), 2, tokens, width)
    per_block = (ours["stream_bytes_per_element"] - plain["stream_bytes_per_element"]) / LAYERS
    real = {name: {"extra_bytes_per_step": per_block * r["layers"] * REAL_BATCH * REAL_TOKENS * r["width"],
                   "layers": r["layers"], "width": r["width"]} for name, r in REAL.items()}
    report = {"tiny_config": config, "latent": latent, "ours": ours, "plain_fp16": plain,
              "extra_stream_bytes_per_element_per_block": per_block, "real": real,
              "real_shape": {"batch": REAL_BATCH, "tokens": REAL_TOKENS}}
    lines = ["# What the FP32 residual stream costs an FP16 graph", "",
             "Made by `python scripts/fp32_residual_cost.py` (tiny random Wan, 4 blocks; counts from the exported "
             "graphs, bytes from ONNX shape inference, before any fusion).", "",
             "| graph | nodes | Casts | bytes written into [B, N, width] tensors per stream element |",
             "|---|---|---|---|",
             f"| ours (FP32 residual, FP16 matmuls/attention) | {ours['nodes']} | {ours['casts']} | "
             f"{ours['stream_bytes_per_element']:.0f} |",
             f"| plain FP16 cast | {plain['nodes']} | {plain['casts']} | {plain['stream_bytes_per_element']:.0f} |",
             "", f"Ours minus plain, per block: {per_block:+.1f} bytes per stream element (negative: ours writes less; "
             "the plain cast goes in and out of diffusers' own FP32 islands around every norm). "
             "At 81 frames 480x832 with CFG:", ""]
    lines += [f"- Wan 2.1 {name}: {r['extra_bytes_per_step'] / 1e9:+.1f} GB of activation writes per step against the "
              f"plain FP16 cast ({r['layers']} blocks x {REAL_BATCH} x {REAL_TOKENS} tokens x {r['width']})"
              for name, r in real.items()]
    write_json_and_markdown(args.out, report, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
