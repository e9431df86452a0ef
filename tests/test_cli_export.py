"""`flowblend export / verify / build` and `generate --backend onnxruntime` on the toy pair, end to end against
the PyTorch backend, and every error path: one line on stderr, exit 2 (exit 1 for a failed verification),
nothing half-written."""
import json
import shutil
import sys

import imageio.v3 as iio
import numpy as np
import pytest

from flowblend.cli.main import main
from flowblend.engines.build import locate_pair_engines
from flowblend.engines.iospec import IOSpec
from flowblend.engines.ort_engine import OrtEngine
from flowblend.engines.store import EngineStore, file_sha256
from flowblend.engines.torch_engine import TorchEngine
from flowblend.families import get_family, load_pair
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions
from flowblend.runtime.text_to_video import TextToVideo

PROMPT = "a red circle moving left"
STEPS = "6"


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    assert main(["export", "--pair", "toy", "--artifacts", str(root), "--no-progress"]) == 0
    return root


def copy_of(artifacts, tmp_path):
    shutil.copytree(artifacts / "toy", tmp_path / "toy")
    return tmp_path


def test_export_verify_build_generate_equals_the_pytorch_backend(artifacts, tmp_path, capsys):
    record = json.loads((artifacts / "toy" / "onnx" / "export.json").read_text())
    assert set(record["models"]) == {"large", "small"} and record["spec"]["batch"] == 2  # toy guidance 4: CFG
    assert main(["verify", "--pair", "toy", "--artifacts", str(artifacts)]) == 0
    out = capsys.readouterr().out
    assert "PASS large [fp32" in out and "PASS small [fp32" in out
    assert main(["build", "--pair", "toy", "--backend", "onnxruntime", "--artifacts", str(artifacts),
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.count(": built ") == 2
    assert main(["build", "--pair", "toy", "--artifacts", str(artifacts), "--no-progress"]) == 0
    assert capsys.readouterr().out.count(": reused ") == 2
    videos = {}
    for backend in ("onnxruntime", "torch"):
        out = tmp_path / f"{backend}.mp4"
        assert main(["generate", "--pair", "toy", "--backend", backend, "--prompt", PROMPT, "--steps", STEPS,
                     "--out", str(out), "--artifacts", str(artifacts), "--no-progress"]) == 0
        written = out if out.exists() else out.with_suffix(".gif")
        videos[backend] = iio.imread(written, index=None)
        assert json.loads(written.with_suffix(".json").read_text())["backend"] == backend
    assert videos["onnxruntime"].shape == videos["torch"].shape
    assert psnr(videos["onnxruntime"], videos["torch"], 255.0) >= 40.0


def test_onnxruntime_latents_and_video_match_pytorch(artifacts):
    """The same comparison below the video encoder: final FP32 latents and the decoded video."""
    family, pair = get_family("toy"), load_pair("toy")
    latent_shape = family.latent_shape(family.frames, family.height, family.width)
    spec = IOSpec(2, latent_shape, family.text_len, family.text_dim)
    paths = locate_pair_engines("toy", "onnxruntime", spec, artifacts)
    engines = {"onnxruntime": {m: OrtEngine(p, name=m) for m, p in paths.items()},
               "torch": {m: TorchEngine(t, name=m) for m, t in pair.transformers.items()}}
    plan = BlendPlan.parse("LSL:0.4,0.2", int(STEPS))
    results = {}
    for backend, chosen in engines.items():
        sampler = Sampler(chosen, plan,
                          SamplerOptions(guidance_scale=family.guidance, **family.sampler_kwargs(latent_shape)))
        results[backend] = TextToVideo(sampler, pair.encode_prompt, pair.decode)(PROMPT, latent_shape, seed=0)
    (video_ort, lat_ort), (video_torch, lat_torch) = results["onnxruntime"], results["torch"]
    assert ((lat_ort - lat_torch).norm() / lat_torch.norm()).item() <= 1e-4
    assert psnr(video_ort.numpy(), video_torch.numpy(), 2.0) >= 40.0  # video in [-1, 1]: peak-to-peak 2


# -- error paths ------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,message", [
    (["--dtype", "fp4"], "unknown dtype"),
    (["--dtype", "fp8"], "--dtype fp8 runs only in PyTorch engines"),
    (["--pair", "sdxl"], "unknown pair"),
    (["--dynamic", "frames=1-9"], "must look like frames=1:9"),
    (["--dynamic", "channels=1:2"], "only frames, height, width can be dynamic"),
    (["--dynamic", "frames=1:3"], "contain the export shape's 9"),
    (["--height", "30"], "multiples of 4"),
    (["--external-data-threshold", "0"], "positive byte count"),
    (["--pair", "wan", "--large", "/no/such/ckpt", "--small", "/no/such/ckpt2"], "does not exist"),
])
def test_export_bad_input(tmp_path, capsys, extra, message):
    assert main(["export", "--artifacts", str(tmp_path), "--no-progress"] + extra) == 2
    assert message in one_line_error(capsys)
    assert list(tmp_path.rglob("*.onnx")) == [] and list(tmp_path.rglob("export.json")) == []


def test_verify_and_build_without_an_export_name_the_command(tmp_path, capsys):
    assert main(["verify", "--pair", "toy", "--artifacts", str(tmp_path)]) == 2
    assert "run `flowblend export --pair toy` first" in one_line_error(capsys)
    assert main(["build", "--pair", "toy", "--artifacts", str(tmp_path), "--no-progress"]) == 2
    assert "run `flowblend export --pair toy` first" in one_line_error(capsys)
    assert main(["generate", "--pair", "toy", "--backend", "onnxruntime", "--prompt", PROMPT, "--artifacts",
                 str(tmp_path), "--out", str(tmp_path / "v.mp4"), "--no-progress"]) == 2
    assert "flowblend export --pair toy" in one_line_error(capsys)
    assert not (tmp_path / "v.mp4").exists()


def test_verify_below_threshold_exits_1(artifacts, tmp_path, capsys):
    root = copy_of(artifacts, tmp_path)
    onnx_dir = root / "toy" / "onnx"
    shutil.copy(onnx_dir / "large.onnx", onnx_dir / "small.onnx")  # the small model's graph is now the large one
    record = json.loads((onnx_dir / "export.json").read_text())
    small = record["models"]["small"]
    small["sha256"], small["bytes"] = file_sha256(onnx_dir / "small.onnx"), (onnx_dir / "small.onnx").stat().st_size
    small["files"] = {"small.onnx": {"sha256": small["sha256"], "bytes": small["bytes"]}}
    (onnx_dir / "export.json").write_text(json.dumps(record))
    assert main(["verify", "--pair", "toy", "--artifacts", str(root)]) == 1
    captured = capsys.readouterr()
    assert "PASS large" in captured.out and "FAIL small" in captured.out
    assert "small failed" in captured.err and "re-export" in captured.err


def test_corrupted_onnx_is_refused_by_verify_and_build(artifacts, tmp_path, capsys):
    root = copy_of(artifacts, tmp_path)
    graph = root / "toy" / "onnx" / "small.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    assert main(["verify", "--pair", "toy", "--artifacts", str(root)]) == 2
    assert "small.onnx is truncated" in one_line_error(capsys)
    assert main(["build", "--pair", "toy", "--artifacts", str(root), "--no-progress"]) == 2
    assert "re-run `flowblend export --pair toy`" in one_line_error(capsys)


def test_generate_onnxruntime_needs_a_build_of_the_right_shape(artifacts, tmp_path, capsys):
    root = copy_of(artifacts, tmp_path)
    shutil.rmtree(root / "toy" / "engines", ignore_errors=True)
    args = ["generate", "--pair", "toy", "--backend", "onnxruntime", "--prompt", PROMPT, "--steps", "2",
            "--artifacts", str(root), "--out", str(tmp_path / "v.mp4"), "--no-progress"]
    assert main(args) == 2
    assert "flowblend build --pair toy --backend onnxruntime" in one_line_error(capsys)
    assert main(["build", "--pair", "toy", "--artifacts", str(root), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(args + ["--frames", "3"]) == 2  # the export is for 9 frames
    assert "re-export" in one_line_error(capsys)
    assert main(args + ["--dtype", "fp16"]) == 2
    assert "fp16" in one_line_error(capsys)
    engine = next(s.path for s in EngineStore(root).find("toy", model="large"))
    engine.write_bytes(engine.read_bytes()[:100])
    assert main(args) == 2
    err = one_line_error(capsys)
    assert "truncated" in err and "flowblend build --pair toy --backend onnxruntime --force" in err
    assert not (tmp_path / "v.mp4").exists()


def test_build_tensorrt_without_tensorrt_says_how_to_install(artifacts, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt fails, installed or not
    assert main(["build", "--pair", "toy", "--backend", "tensorrt", "--artifacts", str(artifacts),
                 "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert "TensorRT is not installed" in err and "pip install 'flowblend[trt]'" in err
    assert not list((artifacts / "toy" / "engines").rglob("*.plan"))
