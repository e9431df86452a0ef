"""ONNX export of tiny random Wan and LTX pairs (the real diffusers classes): the graphs against the diffusers
models called directly, the blended loop over OrtEngines against the PyTorch backend, FP16 casts (FP32
islands, no float64), BF16, external data, a dynamic profile, and failed verification."""
import copy
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny_models import TEXT, WAN_TINY, latent_shape, tiny_pair

from flowblend.engines.iospec import IOSpec
from flowblend.engines.ort_engine import OrtEngine
from flowblend.engines.store import file_sha256
from flowblend.engines.torch_engine import TorchEngine
from flowblend.errors import FlowblendError
from flowblend.export import onnx as onnx_mod
from flowblend.export import verify as verify_mod
from flowblend.export.onnx import export_pair, export_transformer
from flowblend.export.verify import verify_export, verify_onnx
from flowblend.families import LoadedPair, get_family
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions

GUIDANCE = 4.0  # CFG: the graphs are exported for batch 2
FLOAT, FLOAT16, DOUBLE = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE


def spec_for(family, dtype="fp32", dynamic=None):
    return IOSpec(batch=2, latent=latent_shape(family), text_len=TEXT[0], text_dim=TEXT[1], dtype=dtype,
                  with_mask=family == "ltx", dynamic=dynamic or {})


def loaded(family, models):
    return LoadedPair(get_family(family), models, encode_prompt=None, decode=None,
                      sources={name: f"tiny-{family}-{name}" for name in models})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both tiny pairs exported in FP32 and verified; LTX with every weight in external data."""
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for family, threshold in (("wan", 2 * 1024**3), ("ltx", 1)):
        models = tiny_pair(family)
        record = export_pair(loaded(family, models), spec_for(family), root, external_data_threshold=threshold,
                             progress=False)
        out[family] = (models, record)
    return root, out


def diffusers_velocity(family, model, latents, t, text, mask):
    """The transformer called as its diffusers pipeline calls it (not through our signature module)."""
    if family == "wan":
        return model(hidden_states=latents, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    b, c, f, h, w = latents.shape
    tokens = latents.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c)
    out = model(hidden_states=tokens, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
                num_frames=f, height=h, width=w, rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)[0]
    return out.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_exported_graphs_compute_the_diffusers_models(exported, family):
    root, out = exported
    models, record = out[family]
    onnx_dir = root / family / "onnx"
    assert record["opset"] >= 17 and record["dtype"] == "fp32" and record["exporter"].startswith("torch.onnx.export")
    assert {"torch", "diffusers", "onnx", "onnxruntime"} <= set(record["versions"])
    assert json.loads((onnx_dir / "export.json").read_text()) == json.loads(json.dumps(record))
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(2, *latent_shape(family), generator=g)
    text = torch.randn(2, *TEXT, generator=g)
    mask = torch.ones(2, TEXT[0], dtype=torch.int64)
    mask[1, 4:] = 0
    for name, entry in record["models"].items():
        path = onnx_dir / entry["file"]
        assert entry["sha256"] == file_sha256(path) and entry["verify"]["passed"]
        assert entry["verify"]["min_cosine"] >= verify_mod.THRESHOLDS["fp32"]
        external = family == "ltx"
        assert entry["external_data"] == external and (onnx_dir / f"{name}.onnx.data").exists() == external
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        assert names == ["latents", "timestep", "text_embeds"] + (["text_mask"] if family == "ltx" else [])
        assert [o.name for o in session.get_outputs()] == ["velocity"]
        for t in (950.0, 20.0):
            feeds = {"latents": latents.numpy(), "timestep": np.full(2, t, np.float32), "text_embeds": text.numpy()}
            if family == "ltx":
                feeds["text_mask"] = mask.numpy()
            got = session.run(None, feeds)[0]
            with torch.no_grad():
                want = diffusers_velocity(family, models[name], latents, torch.full((2,), t), text, mask).numpy()
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), f"{name} t={t}"
    assert record["models"]["large"]["source_hash"] != record["models"]["small"]["source_hash"]


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_blended_loop_over_ort_engines_matches_the_pytorch_backend(exported, family):
    root, out = exported
    models, record = out[family]
    onnx_dir = root / family / "onnx"
    ort_engines = {m: OrtEngine(onnx_dir / e["file"], name=m) for m, e in record["models"].items()}
    torch_engines = {m: TorchEngine(t, name=m) for m, t in models.items()}
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(1, *latent_shape(family), generator=g)
    cond, uncond = torch.randn(1, *TEXT, generator=g), torch.randn(1, *TEXT, generator=g)
    kw = {}
    if family == "ltx":
        mask = torch.ones(1, TEXT[0], dtype=torch.int64)
        mask[:, 5:] = 0
        kw = dict(prompt_mask=mask, negative_prompt_mask=mask)
    plan = BlendPlan.parse("LSL:0.4,0.2", 6)
    latents = {}
    for backend, engines in (("onnxruntime", ort_engines), ("torch", torch_engines)):
        solver = "unipc" if family == "wan" else "euler"
        latents[backend] = Sampler(engines, plan,
                                   SamplerOptions(solver=solver, shift=3.0, guidance_scale=GUIDANCE)).sample(
            noise, cond, uncond, **kw)
    rel = ((latents["onnxruntime"] - latents["torch"]).norm() / latents["torch"].norm()).item()
    assert rel <= 1e-4, f"{family}: ORT vs PyTorch final latents relative error {rel:.2e}"


def test_verification_fails_for_the_wrong_model_and_checks_files(exported):
    root, out = exported
    models, record = out["wan"]
    wrong = verify_onnx(root / "wan" / "onnx" / "large.onnx", models["small"], spec_for("wan"), timesteps=(500.0,))
    assert not wrong.passed and wrong.min_cosine < 0.99 and "FAIL large" in wrong.summary()
    copy_root = root.parent / "truncated"
    shutil.copytree(root / "ltx", copy_root / "ltx")
    data = copy_root / "ltx" / "onnx" / "small.onnx.data"
    data.write_bytes(data.read_bytes()[:-16])
    with pytest.raises(FlowblendError, match="small.onnx.data is truncated.*flowblend export --pair ltx"):
        verify_export(copy_root, loaded("ltx", out["ltx"][0]))


def _producer(graph):
    return {o: n for n in graph.node for o in n.output}


def _cast_to(node):
    return next(a.i for a in node.attribute if a.name == "to") if node is not None and node.op_type == "Cast" else None


def _no_float64(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    assert not [t.name for t in g.initializer if t.data_type == DOUBLE]
    assert not [n.name for n in g.node if _cast_to(n) == DOUBLE]
    assert not [v.name for v in (*g.value_info, *g.input, *g.output) if v.type.tensor_type.elem_type == DOUBLE]


def test_fp16_export_keeps_fp32_islands_as_explicit_casts(tmp_path):
    model = tiny_pair("wan")["large"]
    # diffusers before 0.36 kept Wan's RoPE tables in float64 (TensorRT takes no float64); as they do:
    model.rope.freqs_cos, model.rope.freqs_sin = model.rope.freqs_cos.double(), model.rope.freqs_sin.double()
    spec = spec_for("wan", "fp16")
    path = export_transformer(model, spec, tmp_path / "large.onnx")
    graph = onnx.load(path).graph
    dtypes = {t.name: t.data_type for t in graph.initializer}
    islands = [n for n in dtypes if any(k in n for k in ("scale_shift_table", "time_embedder", "rope", "norm2"))]
    assert islands and all(dtypes[n] == FLOAT for n in islands)
    assert any(dt == FLOAT16 and ("attn" in n or "ffn" in n) for n, dt in dtypes.items())  # the bulk is FP16
    types = _value_types(onnx.load(path))  # the residual stream, and so every norm's input, is FP32
    layer_norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert layer_norms and all(types[n.input[0]] == FLOAT for n in layer_norms)
    rms_means = [n for n in graph.node if n.op_type == "ReduceMean"]
    assert rms_means and all(types[n.input[0]] == FLOAT for n in rms_means)
    _no_float64(onnx.load(path))
    report = verify_onnx(path, model, spec)
    assert report.passed and report.runner.startswith("onnxruntime") and all(c.nonfinite == 0 for c in report.comparisons)
    assert report.threshold == verify_mod.THRESHOLDS["fp16"] and max(c.max_abs for c in report.comparisons) > 1e-5  # FP16


def _value_types(model) -> dict:
    inferred = onnx.shape_inference.infer_shapes(model)
    out = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input,
                                                           *inferred.graph.output)}
    out.update({t.name: t.data_type for t in model.graph.initializer})
    return out


def test_bf16_ltx_export_is_verified_on_cpu_by_the_reference_evaluator(tmp_path):
    model = tiny_pair("ltx")["small"]
    spec = spec_for("ltx", "bf16")
    path = export_transformer(model, spec, tmp_path / "small.onnx")
    graph = onnx.load(path).graph
    assert onnx.TensorProto.BFLOAT16 in {t.data_type for t in graph.initializer}
    types = _value_types(onnx.load(path))
    rms_means = [n for n in graph.node if n.op_type == "ReduceMean"]
    assert rms_means and all(types[n.input[0]] == FLOAT for n in rms_means)  # norms in FP32
    _no_float64(onnx.load(path))
    report = verify_onnx(path, model, spec)
    assert report.runner.startswith("onnx-reference") and report.passed, report.summary()


def test_dynamic_profile_is_verified_at_min_opt_and_max(tmp_path):
    models = {"small": tiny_pair("wan")["small"]}
    dynamic = {"frames": (1, 4), "height": (2, 6), "width": (4, 8)}
    record = export_pair(loaded("wan", models), spec_for("wan", dynamic=dynamic), tmp_path, progress=False)
    assert record["profile"]["latents"] == [[2, 4, 1, 2, 4], [2, 4, 3, 4, 6], [2, 4, 4, 6, 8]]
    graph = onnx.load(tmp_path / "wan" / "onnx" / "small.onnx").graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == [2, 4] and all(isinstance(d, str) for d in dims[2:])
    checked = {c["shape"] for c in record["models"]["small"]["verify"]["comparisons"]}
    assert checked == {"min", "opt", "max"}
    engine = OrtEngine(tmp_path / "wan" / "onnx" / "small.onnx")  # binds any shape inside the profile
    bufs = {"latents": torch.randn(2, 4, 2, 4, 8), "timestep": torch.full((1, 2), 300.0),
            "text_embeds": torch.randn(2, *TEXT), "velocity": torch.zeros(2, 4, 2, 4, 8)}
    engine.bind(bufs)
    engine.run(0)
    with torch.no_grad():
        want = diffusers_velocity("wan", models["small"], bufs["latents"], bufs["timestep"][0], bufs["text_embeds"],
                                  None)
    assert torch.allclose(bufs["velocity"], want, atol=1e-4)


def test_a_dim_patched_in_threes_is_exported_as_a_multiple_and_bad_profiles_refused(tmp_path):
    """The toy pair patches 3 latent frames per token: its dynamic frames must move in threes."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**dict(WAN_TINY["small"], patch_size=(3, 2, 2))).eval()
    latent = (4, 6, 4, 6)
    with pytest.raises(FlowblendError, match="multiples of 3, e.g. 3:9"):
        IOSpec(batch=2, latent=latent, text_len=TEXT[0], text_dim=TEXT[1], dynamic={"frames": (2, 8)},
               patch=(3, 2, 2))
    spec = IOSpec(batch=2, latent=latent, text_len=TEXT[0], text_dim=TEXT[1], dynamic={"frames": (3, 9)},
                  patch=(3, 2, 2))
    record = export_pair(loaded("wan", {"small": model}), spec, tmp_path, progress=False)
    assert record["profile"]["latents"] == [[2, 4, 3, 4, 6], [2, 4, 6, 4, 6], [2, 4, 9, 4, 6]]
    assert {c["shape"] for c in record["models"]["small"]["verify"]["comparisons"]} == {"min", "opt", "max"}
    assert IOSpec.from_dict(record["spec"]).patch == (3, 2, 2)  # export.json keeps it for the engines side
    engine = OrtEngine(tmp_path / "wan" / "onnx" / "small.onnx")
    bufs = {"latents": torch.randn(2, 4, 9, 4, 6), "timestep": torch.full((1, 2), 700.0),
            "text_embeds": torch.randn(2, *TEXT), "velocity": torch.zeros(2, 4, 9, 4, 6)}
    engine.bind(bufs)
    engine.run(0)
    with torch.no_grad():
        want = diffusers_velocity("wan", model, bufs["latents"], bufs["timestep"][0], bufs["text_embeds"], None)
    assert torch.allclose(bufs["velocity"], want, atol=1e-4)


def test_failed_verification_replaces_nothing_and_new_weights_change_the_graph_hash(exported, monkeypatch):
    root, out = exported
    models, record = out["ltx"]
    work = root.parent / "refused"
    shutil.copytree(root / "ltx", work / "ltx")
    before = {p.name: p.read_bytes() for p in (work / "ltx" / "onnx").iterdir()}
    changed = copy.deepcopy(models["small"])
    with torch.no_grad():
        next(changed.parameters()).add_(0.01)
    staged = {}

    def verify_and_remember(path, *args, **kwargs):
        staged["sha256"] = file_sha256(path)
        return verify_onnx(path, *args, **kwargs)

    monkeypatch.setattr(onnx_mod, "verify_onnx", verify_and_remember)
    monkeypatch.setitem(verify_mod.THRESHOLDS, "fp32", 1.5)  # unreachable: every graph fails its check
    with pytest.raises(FlowblendError, match="failed verification, nothing was written.*FAIL small"):
        export_pair(loaded("ltx", {"small": changed}), spec_for("ltx"), work, external_data_threshold=1,
                    progress=False)
    assert {p.name: p.read_bytes() for p in (work / "ltx" / "onnx").iterdir()} == before  # no staging left either
    # the weights live in .data, yet the graph file's hash (what engine keys cite) followed them
    assert staged["sha256"] != record["models"]["small"]["sha256"]


@torch.library.custom_op("flowblend_test::opaque", mutates_args=())
def opaque(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@opaque.register_fake
def _(x):
    return torch.empty_like(x)


def test_an_unexportable_module_is_one_clear_error(tmp_path):
    class Opaque(torch.nn.Module):  # an op ONNX has no translation for
        input_names, output_names = ("latents", "timestep", "text_embeds"), ("velocity",)

        def forward(self, latents, timestep, text_embeds):
            return opaque(latents)

    with pytest.raises(FlowblendError, match="torch.onnx.export failed for Opaque .*No ONNX function found") as err:
        export_transformer(Opaque(), spec_for("wan"), tmp_path / "x.onnx")
    assert "\x1b[" not in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
