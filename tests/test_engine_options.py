"""The engine options of issue 24 through the one assembly: --dtype fp8 (emulated exactly on the CPU),
--compile, --attention, on the toy pair from the command line; export refuses FP8."""
import json

import imageio.v3 as iio
import numpy as np
import torch

from flowblend.cli.main import main
from flowblend.engines import factory
from flowblend.engines.compile import CompiledStep
from flowblend.engines.fp8 import EmulatedFp8Linear
from flowblend.families import load_pair

PROMPT = "a red circle moving left"


def _generate(tmp_path, name, *flags):
    out = tmp_path / f"{name}.gif"
    assert main(["generate", "--pair", "toy", "--steps", "4", "--prompt", PROMPT, "--out", str(out), "--no-progress",
                 *flags]) == 0
    return iio.imread(out, index=None).astype(np.float64)


def test_generate_in_fp8_tracks_bf16_on_the_toy_pair(tmp_path):
    bf16 = _generate(tmp_path, "bf16", "--dtype", "bf16")
    fp8 = _generate(tmp_path, "fp8", "--dtype", "fp8")
    psnr = 10 * np.log10(255.0 ** 2 / max(np.mean((fp8 - bf16) ** 2), 1e-12))
    assert 20 < psnr < 200  # close to BF16, and not the same video (the linears really are FP8)
    record = json.loads((tmp_path / "fp8.json").read_text())
    assert record["engines"]["dtype"] == "fp8"


def test_fp8_engines_quantize_a_copy_when_asked_and_keep_the_split():
    pair = load_pair("toy")
    engines = factory.make_engines("torch", pair, latent_shape=None, guidance=4.0, dtype="fp8", keep_originals=True)
    for name, engine in engines.items():
        linears = [m for m in engine.step_split.transformer.modules() if isinstance(m, EmulatedFp8Linear)]
        assert linears and not any(isinstance(m, EmulatedFp8Linear) for m in pair.transformers[name].modules())
        assert engine.dtype == torch.bfloat16 and type(engine.step_split).__name__ == "WanStep"


def test_fp8_engines_replace_the_pairs_block_linears_by_default_and_only_once():
    pair = load_pair("toy")
    engines = factory.make_engines("torch", pair, latent_shape=None, guidance=4.0, dtype="fp8")
    for name, engine in engines.items():
        assert engine.step_split.transformer is pair.transformers[name]  # no BF16 copy left beside the FP8 one
        assert any(isinstance(m, EmulatedFp8Linear) for m in pair.transformers[name].modules())
    quantized = {n: m for n, m in pair.transformers["large"].named_modules() if isinstance(m, EmulatedFp8Linear)}
    factory.make_engines("torch", pair, latent_shape=None, guidance=4.0, dtype="fp8")  # a second run, same models
    again = {n: m for n, m in pair.transformers["large"].named_modules() if isinstance(m, EmulatedFp8Linear)}
    assert again.keys() == quantized.keys() and all(again[n] is quantized[n] for n in again)


def test_torch_compile_keeps_the_step_split_it_used_to_lose():
    """issue 23's drift: torch.compile wrapped the signature module, so the split was silently lost."""
    engines = factory.make_engines("torch-compile", load_pair("toy"), latent_shape=None, guidance=4.0)
    assert all(isinstance(e.step_split, CompiledStep) and e.compile == "whole" for e in engines.values())
    eager = factory.make_engines("torch", load_pair("toy"), latent_shape=None, guidance=4.0)
    assert all(e.compile == "none" for e in eager.values())  # the CPU default; regional is CUDA's


def test_export_refuses_fp8_in_one_line(tmp_path, capsys):
    """ONNX graphs and built engines (which `build` makes from the export) are never FP8 here."""
    rc = main(["export", "--pair", "toy", "--dtype", "fp8", "--artifacts", str(tmp_path / "a"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--dtype fp8 runs only in PyTorch engines" in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists()


def test_the_bench_names_the_attention_and_measures_fp8(tmp_path):
    # --backend torch: torch-compile of the FP8 engines spends minutes failing in C++ codegen on this CPU
    assert main(["bench", "--pair", "toy", "--backend", "torch", "--steps", "2", "--plan", "LLL", "--repeats", "1",
                 "--warmup", "1",
                 "--overhead-repeats", "0", "--no-progress", "--dtype", "fp8", "--attention", "math",
                 "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert {c["attention"] for c in report["cases"]} == {"math (requested)"}
    assert report["options"]["dtype"] == "fp8"  # the precision name (its torch dtype: options.torch_dtype)
    assert "Attention: torch: math (requested)" in (tmp_path / "b" / "bench.md").read_text()
