"""scripts/gpu_run.py (the one command for a bare GPU machine) on CPU: it gets as far as it can and
reports every GPU row SKIPPED with its reason, never FAIL; a missing Python dependency (what the bare
machine lacks without its copied wheels) is a SKIPPED row naming the package, not a crash."""
import importlib.util
import json
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


def test_the_runner_reports_every_gpu_row_skipped_with_its_reason(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "scripts/gpu_run.py", "--no-install", "--out", str(out), "--budget", "400",
                           "--checks-args=--quick", "--pytest-args", "tests/test_gpu.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "gpu-run.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["install", "kernels", "checks", "pytest", "bench"]
    assert all(s["status"] in ("pass", "skipped") for s in steps.values()), steps
    for name in ("checks", "pytest", "bench"):  # nothing of these can run without a GPU
        assert steps[name]["status"] == "skipped" and steps[name]["reason"], steps[name]
    assert all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in steps["checks"]["checks"].values())
    assert steps["pytest"]["counts"]["failed"] == 0 and steps["pytest"]["counts"]["skipped"] > 0
    assert "needs a CUDA GPU" in steps["pytest"]["reason"]
    md = (out / "gpu-run.md").read_text()
    assert "| bench | SKIPPED |" in md and "FAIL" not in md


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
