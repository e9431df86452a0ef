"""FP16 exports that do not overflow: mixed precision (export/precision.py) against planted outliers.

Trained video DiTs have outlier channels whose residual stream passes FP16's 65504 while every
layer's own output fits. The tiny Wan and LTX models here get such a channel planted (each block's
FFN adds 3e4 to it through a gate of 1), and the independent references are the FP32 diffusers
model and a plain whole-model FP16 export of it, both run here.
"""
import copy

import numpy as np
import onnx
import pytest
import torch
from tiny_models import LTX_TINY, TEXT, WAN_TINY, latent_shape

from flowblend.engines.iospec import IOSpec
from flowblend.engines.signature import signature_for
from flowblend.export.onnx import cast_for_export, export_transformer
from flowblend.export.precision import layout_dtype
from flowblend.export.verify import verify_onnx
from flowblend.families import get_family, load_transformer

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
OUTLIER, CHANNEL, LAYERS = 3.0e4, 3, 4


def spec_for(family, dtype="fp16"):
    return IOSpec(batch=2, latent=latent_shape(family), text_len=TEXT[0], text_dim=TEXT[1], dtype=dtype,
                  with_mask=family == "ltx")


def outlier_model(family):
    """A 4-block tiny model whose every FFN adds OUTLIER to channel CHANNEL of the residual stream."""
    from diffusers import LTXVideoTransformer3DModel, WanTransformer3DModel

    torch.manual_seed(0)
    if family == "wan":
        model = WanTransformer3DModel(**dict(WAN_TINY["large"], num_layers=LAYERS)).eval()
    else:
        model = LTXVideoTransformer3DModel(**dict(LTX_TINY["large"], num_layers=LAYERS)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
        for block in (model.blocks if family == "wan" else model.transformer_blocks):
            ffn = block.ffn if family == "wan" else block.ff
            ffn.net[2].bias[CHANNEL] = OUTLIER
            table = block.scale_shift_table  # Wan [1, 6, dim], LTX [6, dim]: row 5 is the FFN's gate
            table.view(-1, table.shape[-1])[5, CHANNEL] = 1.0
    return model


def residual_peak(model, family, spec):
    """Largest |value| the FP32 residual stream reaches between blocks."""
    peaks = []
    blocks = model.blocks if family == "wan" else model.transformer_blocks
    hooks = [b.register_forward_hook(lambda m, i, o: peaks.append(float(o.abs().max()))) for b in blocks]
    try:
        with torch.no_grad():
            out = signature_for(model)(*[x.float() if x.is_floating_point() else x for x in spec.sample_inputs()])
    finally:
        for h in hooks:
            h.remove()
    return max(peaks), out


def plain_fp16_export(model, spec, path):
    """The whole model cast to FP16 (diffusers' islands kept, residual stored in FP16), exported as is."""
    module = signature_for(cast_for_export(copy.deepcopy(model), torch.float16)).eval()
    with torch.no_grad():
        torch.onnx.export(module, spec.sample_inputs(), str(path), dynamo=True, opset_version=18,
                          input_names=list(spec.input_names), output_names=["velocity"], verbose=False)
    # onnx's reference evaluator computes each FP16 op in FP16; ORT's CPU provider runs FP16 ops that lack a
    # kernel in FP32 and drops the Casts between them, which hides this overflow for LTX (finite output)
    from onnx.reference import ReferenceEvaluator

    feeds = {n: x.numpy() for n, x in zip(spec.input_names, spec.sample_inputs())}
    return np.asarray(ReferenceEvaluator(str(path)).run(None, feeds)[0])


@pytest.fixture(scope="module", params=["wan", "ltx"])
def exported(request, tmp_path_factory):
    """(family, FP32 outlier model, spec, our FP16 graph), exported once per family for the tests below."""
    family, model, spec = request.param, outlier_model(request.param), spec_for(request.param)
    return family, model, spec, export_transformer(model, spec, tmp_path_factory.mktemp(family) / "g.onnx")


def test_planted_outliers_overflow_a_plain_fp16_export_but_not_ours(exported, tmp_path):
    family, model, spec, path = exported
    peak, fp32_out = residual_peak(model, family, spec)
    assert peak > 65504 and torch.isfinite(fp32_out).all()  # FP32 holds what FP16 cannot

    plain = plain_fp16_export(model, spec, tmp_path / "plain.onnx")
    assert not np.isfinite(plain).all()  # the failure users see: NaN/black videos

    report = verify_onnx(path, model, spec)  # ONNX Runtime against the FP32 diffusers model
    assert report.passed and report.min_cosine >= 0.999, report.summary()
    assert all(c.nonfinite == 0 for c in report.comparisons) and report.min_cosine < 1 - 1e-8  # really FP16
    twin = verify_onnx(path, model, spec, twin=True)  # what runs at real sizes
    assert twin.passed and twin.comparisons[0].shape == "twin", twin.summary()


def _types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input,
                                                              *inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def test_fp16_graph_runs_matmuls_and_attention_in_fp16_and_the_rest_in_fp32(exported):
    family, model, _, path = exported
    graph = onnx.load(path)
    types, init = _types(graph), {t.name: t for t in graph.graph.initializer}
    weight_matmuls = [n for n in graph.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")
                      and any(i in init and init[i].data_type in (FLOAT, FLOAT16) and len(init[i].dims) >= 2
                              for i in n.input)]
    by_dtype = {types.get(n.output[0]) for n in weight_matmuls}
    # every weight matmul in FP16 except the FP32 islands' own (timestep embedding, modulation projection)
    fp32_matmuls = [n for n in weight_matmuls if types.get(n.output[0]) == FLOAT]
    assert FLOAT16 in by_dtype and len(fp32_matmuls) <= 4
    softmax = [n for n in graph.graph.node if n.op_type == "Softmax"]
    assert softmax and all(types[n.input[0]] == FLOAT16 for n in softmax)  # attention core in FP16
    norms = [n for n in graph.graph.node if n.op_type in ("LayerNormalization", "SimplifiedLayerNormalization")]
    means = [n for n in graph.graph.node if n.op_type == "ReduceMean"]
    assert norms or means
    assert all(types[n.input[0]] == FLOAT for n in (*norms, *means))  # every norm in FP32
    # the islands' weights are the source's FP32 values, never round-tripped through FP16
    source = dict(model.named_parameters())
    islands = {n: t for n, t in init.items() if any(k in n for k in ("scale_shift_table", "norm_q", "time_emb"))}
    assert islands
    for name, t in islands.items():
        key = max((k for k in source if name.endswith(k)), key=len)  # blocks.0.x before the top-level x
        assert t.data_type == FLOAT and np.array_equal(onnx.numpy_helper.to_array(t), source[key].detach().numpy())


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_a_checkpoint_loads_straight_into_the_export_layout(family, tmp_path):
    from diffusers import LTXVideoTransformer3DModel, WanTransformer3DModel

    cls, config = (WanTransformer3DModel, WAN_TINY) if family == "wan" else (LTXVideoTransformer3DModel, LTX_TINY)
    torch.manual_seed(0)
    source = cls(**config["large"]).eval()
    source.save_pretrained(tmp_path / "ckpt" / "transformer")
    model = load_transformer(get_family(family), str(tmp_path / "ckpt"), torch.float16, False, export_layout=True)
    assert layout_dtype(model) == torch.float16 and type(model).__name__ == cls.__name__
    want = dict(source.named_parameters())
    for name, p in model.named_parameters():
        if p.dtype == torch.float32:  # an island: bit-exact from the checkpoint
            assert torch.equal(p, want[name]), name
        else:
            assert p.dtype == torch.float16 and torch.equal(p, want[name].half()), name
    for name, b in model.named_buffers():  # RoPE tables computed in FP32, as a fresh model's
        assert b.dtype == torch.float32 and torch.equal(b, dict(source.named_buffers())[name].float())


def test_a_broken_written_graph_fails_the_twin_verification(exported, tmp_path):
    family, model, spec, written = exported
    graph, path = onnx.load(written), tmp_path / "broken.onnx"
    cast = next(n for n in graph.graph.node if n.op_type == "Cast" and n.attribute[0].i == FLOAT)
    cast.attribute[0].i = FLOAT16  # a wrong cast: one FP32 island fed in FP16
    onnx.save(graph, path)
    report = verify_onnx(path, model, spec, twin=True)
    assert not report.passed and not report.structure_ok and "casts differ" in report.graph
