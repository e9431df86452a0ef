"""Checkpoints read straight into the export layout (export/checkpoint.py), and what an export keeps in memory.

References: the FP32 diffusers model that was saved (its values, and `.half()` of them for the regions),
the files safetensors' save_pretrained writes (one or several shards with an index), /proc/self/maps
for what stays mapped, and weak references for what stays alive.
"""
import gc
import json
import weakref
from pathlib import Path

import onnx
import pytest
import torch
from tiny_models import LTX_TINY, TEXT, WAN_TINY, latent_shape, tiny_pair

from flowblend.cli.main import main
from flowblend.engines.iospec import IOSpec
from flowblend.errors import FlowblendError
from flowblend.export import checkpoint
from flowblend.export.onnx import export_pair
from flowblend.export.precision import islands_of, layout_dtype
from flowblend.export.trace import SHARE_MIN_BYTES, TWIN_UNSHARED, export_transformer
from flowblend.export.verify import twin_spec, verify_onnx
from flowblend.families import LoadedPair, get_family, load_transformer

SHARD = "20KB"  # the tiny models' ~60-200 KB of FP32 weights in several files, as the 14B's 57 GB are


def saved(family: str, root: Path, shard: str | None = SHARD):
    """The tiny large model of `family`, saved as a diffusers checkpoint under root/transformer."""
    from diffusers import LTXVideoTransformer3DModel, WanTransformer3DModel

    cls, config = (WanTransformer3DModel, WAN_TINY) if family == "wan" else (LTXVideoTransformer3DModel, LTX_TINY)
    torch.manual_seed(0)
    source = cls(**config["large"]).eval()
    with torch.no_grad():
        for p in source.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    kwargs = {"max_shard_size": shard} if shard else {}
    source.save_pretrained(root / "transformer", **kwargs)
    return source


def shards(root: Path) -> list[Path]:
    return sorted((root / "transformer").glob("diffusion_pytorch_model*.safetensors"))


@pytest.mark.parametrize("family", ["wan", "ltx"])
@pytest.mark.parametrize("shard", [SHARD, None], ids=["sharded", "one-file"])
def test_sharded_and_single_checkpoints_load_bit_exact_into_the_layout(family, shard, tmp_path):
    source = saved(family, tmp_path / "ckpt", shard)
    if shard:
        assert len(shards(tmp_path / "ckpt")) >= 3 and (tmp_path / "ckpt" / "transformer" / checkpoint.INDEX).is_file()
    model = load_transformer(get_family(family), str(tmp_path / "ckpt"), torch.float16, False, export_layout=True)
    assert layout_dtype(model) == torch.float16 and type(model).__name__ == type(source).__name__
    want, islands = dict(source.named_parameters()), islands_of(source)
    low = 0
    for name, p in model.named_parameters():
        assert not p.is_meta, name
        if set(name.split(".")) & set(islands):  # an island: the source's FP32 values, bit for bit
            assert p.dtype == torch.float32 and torch.equal(p, want[name]), name
        else:
            assert p.dtype == torch.float16 and torch.equal(p, want[name].half()), name
            low += 1
    assert low and set(dict(model.named_parameters())) == set(want)
    for name, b in model.named_buffers():
        assert b.dtype == torch.float32 and torch.equal(b, dict(source.named_buffers())[name].float())


def test_no_checkpoint_file_stays_mapped_once_loaded(tmp_path):
    saved("wan", tmp_path / "ckpt")
    files = {str(p) for p in shards(tmp_path / "ckpt")}
    model = load_transformer(get_family("wan"), str(tmp_path / "ckpt"), torch.float16, False, export_layout=True)
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("no /proc/self/maps on this system")
    mapped = {line.split(maxsplit=5)[-1].strip() for line in maps.read_text().splitlines() if len(line.split()) >= 6}
    assert not files & mapped  # FP32 islands used to stay views of the mapped shard (all of it counted in RSS)
    assert next(model.parameters()).untyped_storage().nbytes() > 0


@pytest.mark.parametrize("damage", ["missing", "truncated", "missing tensor"])
def test_a_damaged_sharded_checkpoint_is_refused_in_one_line(damage, tmp_path, capsys):
    saved("wan", tmp_path / "ckpt")
    first = shards(tmp_path / "ckpt")[1]
    if damage == "missing":
        first.unlink()
        message = f"lacks 1 of the shards its {checkpoint.INDEX} names ({first.name})"
    elif damage == "truncated":
        first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
        message = f"{first.name} is not a readable safetensors file"
    else:
        index = tmp_path / "ckpt" / "transformer" / checkpoint.INDEX
        data = json.loads(index.read_text())
        gone = sorted(data["weight_map"])[0]
        del data["weight_map"][gone]
        index.write_text(json.dumps(data))
        message = f"lacks 1 of WanTransformer3DModel's weights (e.g. ['{gone}'])"
    with pytest.raises(FlowblendError, match="re-download|not a checkpoint") as exc:
        load_transformer(get_family("wan"), str(tmp_path / "ckpt"), torch.float16, False, export_layout=True)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    artifacts = tmp_path / "artifacts"
    assert main(["export", "--pair", "wan", "--large", str(tmp_path / "ckpt"), "--small", str(tmp_path / "ckpt"),
                 "--artifacts", str(artifacts), "--no-progress", "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (artifacts / "wan" / "onnx" / "export.json").exists()


@pytest.mark.parametrize("damage", ["index not json", "no safetensors", "other model's weights"])
def test_a_checkpoint_that_is_not_this_models_safetensors_is_refused_in_one_line(damage, tmp_path):
    folder = tmp_path / "ckpt" / "transformer"
    if damage == "index not json":
        saved("wan", tmp_path / "ckpt")
        (folder / checkpoint.INDEX).write_text("{not json")
        message = f"{checkpoint.INDEX} is not a safetensors index"
    elif damage == "no safetensors":
        saved("wan", tmp_path / "ckpt", shard=None)
        (folder / checkpoint.WEIGHTS).rename(folder / "diffusion_pytorch_model.bin")
        message = f"has no {checkpoint.WEIGHTS} or {checkpoint.INDEX} (found: diffusion_pytorch_model.bin)"
    else:  # the config of a wider FFN beside these weights
        saved("wan", tmp_path / "ckpt")
        config = json.loads((folder / "config.json").read_text())
        config["ffn_dim"] *= 2
        (folder / "config.json").write_text(json.dumps(config))
        message = "the config and weights are of different models"
    with pytest.raises(FlowblendError) as exc:
        load_transformer(get_family("wan"), str(tmp_path / "ckpt"), torch.float16, False, export_layout=True)
    assert message in str(exc.value) and "\n" not in str(exc.value)


SPEC = IOSpec(batch=2, latent=latent_shape("wan"), text_len=TEXT[0], text_dim=TEXT[1], dtype="fp16")


def test_an_export_that_releases_its_models_frees_every_weight(tmp_path):
    models = tiny_pair("wan")
    alive = [weakref.ref(t) for m in models.values() for t in (*m.parameters(), *m.buffers())]
    pair = LoadedPair(get_family("wan"), models, None, None, {"large": "tiny", "small": "tiny"})
    del models
    record = export_pair(pair, SPEC, tmp_path, external_data_threshold=1, progress=False, release_models=True)
    assert all(e["verify"]["passed"] for e in record["models"].values())
    gc.collect()
    # nothing of the models is left (at the real widths, onnxscript's rewrite rules kept the last graph they
    # matched, whose initializers were views of the parameters; export_transformer drops them)
    assert sum(r() is not None for r in alive) == 0
    assert all(p.is_meta for m in pair.transformers.values() for p in m.parameters())


def test_a_twin_reads_every_weight_from_the_written_data(tmp_path):
    model = tiny_pair("wan")["large"]
    written = export_transformer(model, SPEC, tmp_path / "large.onnx", external_data_threshold=1)
    twin = export_transformer(model, twin_spec(SPEC), tmp_path / "large.twin.onnx", twin_of=written)
    graph, main = (onnx.load(p, load_external_data=False) for p in (twin, written))
    kinds = {(t.data_type, tuple(t.dims)) for t in main.graph.initializer if t.external_data}
    # inline: only constants of the reduced shape (nothing the written graph holds in its .data)
    inline = [t.name for t in graph.graph.initializer if not t.external_data and len(t.raw_data) >= SHARE_MIN_BYTES
              and ("." in t.name or (t.data_type, tuple(t.dims)) in kinds)]
    folded = [t.name for t in graph.graph.initializer if t.external_data and "." not in t.name]
    assert not inline and folded  # the exporter's folded W^T (val_N) too, not only the named parameters
    assert {p.key: p.value for p in graph.metadata_props}[TWIN_UNSHARED] == ""


def test_a_written_weight_that_differs_from_the_module_fails_the_twin(tmp_path):
    model = tiny_pair("wan")["large"]
    written = export_transformer(model, SPEC, tmp_path / "large.onnx", external_data_threshold=1)
    graph = onnx.load(written, load_external_data=False)
    folded = next(t for t in graph.graph.initializer if t.external_data and "." not in t.name)
    where = {e.key: e.value for e in folded.external_data}
    data = tmp_path / where["location"]
    middle = int(where["offset"]) + int(where["length"]) // 2
    raw = bytearray(data.read_bytes())
    raw[middle] ^= 0x40  # one bit of one folded weight in the middle: its first bytes still match
    data.write_bytes(bytes(raw))
    report = verify_onnx(written, model, SPEC, twin=True)
    assert not report.passed and not report.structure_ok and "differ from the written .data" in report.graph
