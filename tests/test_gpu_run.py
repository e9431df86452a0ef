"""scripts/gpu_run.py (the one command for a bare GPU machine) on CPU: it gets as far as it can and
reports every GPU row SKIPPED with its reason, never FAIL; a missing Python dependency (what the bare
machine lacks without its copied wheels) is a SKIPPED row naming the package, not a crash."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of the GPU runner")


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkout_copy(tmp_path: Path) -> Path:
    """The runner builds csrc/ into its checkout's build/ and installs from its checkout: a test runs it on a
    copy, so the real checkout's build/ and egg-info stay as they are (and a stale build/ cannot hide a
    build that no longer works)."""
    copy = tmp_path / "checkout"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "build", ".whl", "*.egg-info", "__pycache__",
                                                               ".pytest_cache", ".ruff_cache", "demo", ".venv*"))
    return copy


def test_the_runner_reports_every_gpu_row_skipped_with_its_reason(tmp_path):
    out = tmp_path / "run"
    # Its budget is planned for a 16-core GPU machine (15 s of 475 for the kernel build); a fresh nvcc build takes
    # 11 s on a quiet 2-core machine and several times that on a loaded one: 2.5x the budget (38 s for the build).
    done = subprocess.run([sys.executable, "scripts/gpu_run.py", "--no-install", "--out", str(out), "--budget", "1200",
                           "--checks-args=--quick", "--pytest-args", "tests/test_gpu.py"],
                          cwd=checkout_copy(tmp_path), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "gpu-run.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["install", "interpreter", "kernels", "checks", "pytest", "bench", "fullsize"]
    assert all(s["status"] in ("pass", "skipped") for s in steps.values()), steps
    assert "no GPU on this machine" in steps["interpreter"]["reason"] and steps["interpreter"]["torch"]
    for name in ("checks", "pytest", "bench", "fullsize"):  # nothing of these can run without a GPU
        assert steps[name]["status"] == "skipped" and steps[name]["reason"], steps[name]
    assert all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in steps["checks"]["checks"].values())
    assert steps["pytest"]["counts"]["failed"] == 0 and steps["pytest"]["counts"]["skipped"] > 0
    assert "needs a CUDA GPU" in steps["pytest"]["reason"]
    md = (out / "gpu-run.md").read_text()
    assert "| bench | SKIPPED |" in md and "| fullsize | SKIPPED |" in md and "FAIL" not in md
    assert sum(report["budget_plan_s"].values()) <= 480  # the whole command fits 8 minutes on one H200


FAKE_TORCH = """
import types
__version__ = "0.0+venv-marker"
version = types.SimpleNamespace(cuda=None)
cuda = types.SimpleNamespace(is_available=lambda: False, get_device_name=lambda: None)
"""
INSTALL_FROM_INSIDE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("gpu_run", sys.argv[1])
gpu_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_run)
runner = gpu_run.Runner(gpu_run.parse_args(sys.argv[2:]))
runner.out.mkdir(parents=True)
runner.log = runner.out / "gpu-run.log"
runner.environment = {}
rows = [runner.install(), runner.interpreter(gpu_seen=False)]
print(json.dumps({"python": runner.python, "pythonpath": runner.env.get("PYTHONPATH", ""), "rows": rows}))
"""


def test_the_install_step_keeps_the_interpreter_that_has_torch(tmp_path):
    """The GPU machine's python is itself a venv with CUDA torch; a venv made from it sees only the base
    interpreter's site-packages (no torch). Reproduced here: torch (a marked stand-in) lives in a venv's
    own site-packages, the install step runs from inside that venv, and the interpreter every later step
    uses must still import that torch (the old step made a second venv and lost it)."""
    import os
    import venv

    outer = tmp_path / "outer"
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(outer)
    python = outer / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    # The outer venv sees the site-packages of the interpreter running this test (its pip and setuptools: the
    # environment a newcomer installed flowblend with), not the base interpreter's, which may have neither (a
    # venv made from it saw the base: "flowblend is not installed" wherever flowblend lived only in a venv).
    # Listed on a .pth, so their own .pth files (this interpreter's editable flowblend) are not read.
    running = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(site) / "running-interpreter.pth").write_text("\n".join(running) + "\n")
    (Path(site) / "torch").mkdir()
    (Path(site) / "torch" / "__init__.py").write_text(FAKE_TORCH)
    (tmp_path / "wheels").mkdir()
    script = tmp_path / "install_from_inside.py"
    script.write_text(INSTALL_FROM_INSIDE)
    source = checkout_copy(tmp_path)  # the install step runs `pip install -e .` in its checkout
    done = subprocess.run([str(python), str(script), str(source / "scripts" / "gpu_run.py"), "--out", str(tmp_path / "r"),
                           "--wheels", str(tmp_path / "wheels"), "--source-tree", str(tmp_path / "src")],
                          cwd=source, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    install, interpreter = result["rows"]
    assert install["status"] == "pass", install
    assert interpreter["status"] == "skipped" and interpreter["torch"] == "0.0+venv-marker", interpreter
    env = dict(os.environ, PYTHONPATH=result["pythonpath"]) if result["pythonpath"] else None
    asked = subprocess.run([result["python"], "-c", "import torch, flowblend.runtime; print(torch.__version__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert asked.stdout.strip() == "0.0+venv-marker", asked.stderr[-2000:]


def test_a_gpu_that_torch_cannot_see_is_one_fail_row_saying_why(tmp_path):
    runner_module = load_script("gpu_run")
    runner = runner_module.Runner(runner_module.parse_args(["--out", str(tmp_path), "--no-install"]))
    runner.log, runner.environment = tmp_path / "log", {}
    row = runner.interpreter(gpu_seen=True)  # nvidia-smi saw a GPU; this CPU torch cannot
    assert row["status"] == "fail" and "torch.cuda.is_available() is False" in row["reason"]
    assert sys.executable in row["reason"]


def test_the_whole_tests_folder_collects_without_the_serve_extra():
    """The GPU image has no fastapi, uvicorn or ray and nothing can be installed there: `pytest -m "gpu or
    tensorrt" tests` must collect (the serve tests skip, naming the extra), not stop at an import error."""
    code = ("import sys\nfor m in ('fastapi', 'uvicorn', 'ray'): sys.modules[m] = None\n"
            "import pytest\nsys.exit(pytest.main(['--collect-only', '-q', '-rs', '-m', 'gpu or tensorrt', 'tests']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "error" not in done.stdout.lower().split("short test summary")[0][-500:]
    assert "needs the serve extra (fastapi, uvicorn not installed): pip install 'flowblend[serve]'" in done.stdout
    assert "tests/test_gpu.py::" in done.stdout


def test_blas_workspace_follows_pytorchs_rule():
    from flowblend.bench.memory import blas_workspace_bytes

    mib = 2**20
    assert blas_workspace_bytes(None) == 0
    assert blas_workspace_bytes((9, 0), environ={}) == 33 * mib  # :4096:8 + cuBLASLt's 1024 KiB
    assert blas_workspace_bytes((8, 0), environ={}) == 8 * mib + 128 * 1024 + mib  # :4096:2:16:8
    assert blas_workspace_bytes((9, 0), environ={"CUBLAS_WORKSPACE_CONFIG": ":4096:2"}) == 9 * mib
    assert blas_workspace_bytes((9, 0), environ={"CUBLASLT_WORKSPACE_SIZE": "0"}) == 32 * mib


def test_a_missing_dependency_is_a_skipped_check_naming_it(tmp_path, monkeypatch):
    checks = load_script("gpu_checks")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what the bare machine lacks before its wheels
    monkeypatch.setattr(checks.fused, "load_library", lambda path=None: object())
    assert checks.main(["--out", str(tmp_path), "--only", "fused_host"]) == 0
    row = json.loads((tmp_path / "gpu-checks.json").read_text())["checks"]["fused_host"]
    assert row["status"] == "skipped" and "'diffusers' is not installed" in row["reason"]


def test_the_benchmark_without_its_dependencies_exits_skipped(monkeypatch, capsys):
    bench = load_script("gpu_bench")
    monkeypatch.setitem(sys.modules, "accelerate", None)
    assert bench.main(["--dry-run", "--out", "/nonexistent"]) == bench.SKIPPED
    assert "'accelerate' is not installed" in capsys.readouterr().out


def test_the_real_size_stage_on_cpu_reports_every_row_skipped(tmp_path):
    fullsize = load_script("gpu_fullsize")
    assert fullsize.main(["--out", str(tmp_path)]) == fullsize.SKIPPED
    report = json.loads((tmp_path / "fullsize.json").read_text())
    stages = report["stages"]
    assert list(stages)[:3] == ["build", "step_large_eager", "step_small_eager"] and list(stages)[-1] == "step_small_whole"
    assert {"loop_eager", "loop_regional+fp8", "projection", "wan22", "step_large_regional+fp8"} <= set(stages)
    assert all(r["status"] == "skipped" and "no CUDA GPU" in r["reason"] for r in stages.values())


def test_the_real_size_stage_runs_end_to_end_at_tiny_sizes(tmp_path):
    """Eager and FP8 (emulated off CUDA) engines; the compile options' own test is tests/test_compile.py."""
    from flowblend.bench.fullsize import EngineOption

    fullsize = load_script("gpu_fullsize")
    fullsize.FULLSIZE_OPTIONS = (EngineOption("eager"), EngineOption("eager+fp8", {"dtype": "fp8"}))
    assert fullsize.main(["--out", str(tmp_path), "--dry-run", "--reps", "1"]) == 0
    stages = json.loads((tmp_path / "fullsize.json").read_text())["stages"]
    assert list(stages) == ["build", "step_large_eager", "step_small_eager", "step_large_eager+fp8",
                            "step_small_eager+fp8", "loop_eager", "loop_eager+fp8", "projection", "wan22"]
    assert all(r["status"] == "pass" for r in stages.values()), stages
    assert stages["loop_eager"]["graph"].startswith("skipped: CUDA graphs need a GPU")
    assert 0.9 < stages["step_large_eager+fp8"]["velocity_cosine_vs_eager"] < 1.0
    assert 0.9 < stages["loop_eager+fp8"]["final_latents_cosine_vs_bf16"] <= 1.0
    assert set(stages["projection"]["per_option"]) == {"eager", "eager+fp8"}
    projection = stages["projection"]
    assert projection["label"].startswith("PROJECTION")
    eager = projection["per_option"]["eager"]  # 30 large + 20 small steps vs 50 large, from the measured steps
    large, small = stages["step_large_eager"]["step_s"], stages["step_small_eager"]["step_s"]
    assert abs(eager["LLL"] - 50 * large) < 1e-9 and abs(eager["LSL"] - (30 * large + 20 * small)) < 1e-9
    assert set(stages["wan22"]["step_s"]) == {"high", "low", "small"}
    assert "PROJECTION" in (tmp_path / "fullsize.md").read_text()


def test_a_stage_that_cannot_fit_is_a_timeout_row_and_the_next_still_runs():
    from flowblend.bench.fullsize import FullsizeSettings, FullsizeStage

    stage = FullsizeStage(FullsizeSettings(configs={}, device=torch.device("cpu"), budget_s=5.0))
    slow = stage.run("slow", 60.0, lambda: {"status": "pass"})
    quick = stage.run("quick", 0.0, lambda: {"status": "pass"})
    assert slow["status"] == "timeout" and "needs ~60 s" in slow["reason"] and quick["status"] == "pass"


def test_the_memory_summary_finds_the_peak_and_who_held_it():
    """A synthetic allocator history in torch.cuda.memory._snapshot()'s documented format."""
    from flowblend.bench.cuda_memory import BEFORE, peak_attribution

    def frames(name):
        return [{"filename": "/x/site-packages/diffusers/models/attention.py", "line": 7, "name": name}]

    mib = 2**20
    trace = [{"action": "alloc", "addr": 100, "size": 4 * mib, "frames": frames("qkv")},
             {"action": "alloc", "addr": 200, "size": 6 * mib, "frames": frames("ffn")},
             {"action": "free_requested", "addr": 100, "size": 4 * mib, "frames": []},
             {"action": "free_completed", "addr": 100, "size": 4 * mib, "frames": []},
             {"action": "free_requested", "addr": 1, "size": 1 * mib, "frames": []},  # held before the history
             {"action": "free_completed", "addr": 1, "size": 1 * mib, "frames": []},
             {"action": "alloc", "addr": 300, "size": 1 * mib, "frames": frames("out")}]
    segments = [{"device": 0, "blocks": [{"address": 0, "size": 8 * mib, "state": "active_allocated"},
                                         {"address": 200, "size": 6 * mib, "state": "active_allocated"},
                                         {"address": 300, "size": 1 * mib, "state": "active_allocated"},
                                         {"address": 400, "size": 2 * mib, "state": "inactive"}]}]
    out = peak_attribution({"segments": segments, "device_traces": [trace]})
    assert out["peak_live_bytes"] == 19 * mib  # 8 + 1 held before, + 4 + 6 at the second alloc
    groups = {g["owner"]: g["bytes"] for g in out["groups"]}
    assert groups[BEFORE] == 9 * mib
    assert groups["diffusers/models/attention.py:7 qkv"] == 4 * mib
    assert groups["diffusers/models/attention.py:7 ffn"] == 6 * mib
    assert out["end_live_bytes"] == 15 * mib
