"""Everything the project checks on a GPU, in one command, on the GPU machine as it comes (issues #15, #22).

    python3 scripts/gpu_run.py                       # on the GPU machine, from the project root
    python3 scripts/gpu_run.py --no-install --out /tmp/run --budget 300     # anywhere (CPU: all SKIPPED)

The machine comes with CUDA torch in its own python (/opt/torch/.venv, itself a venv) but without
diffusers, polygraphy, torchao, fastapi, uvicorn or ray, and without registry access;
`../shared/gpu/fetch-wheels.sh` (run on a connected machine) downloads what it lacks into `.whl/`,
which travels with the checkout. In order, each step with its share of an 8-minute budget, planned
from the H200 run of 2026-12-04 (BUDGET_PLAN; a step that runs out is TIMEOUT, the next ones still run):

1. install: the copied wheels (`--no-index --no-deps`) and `pip install --no-deps --no-build-isolation
   -e .` into THIS interpreter's environment (a venv made from a venv sees the base interpreter's
   site-packages, not its parent's: no torch there), then the interpreter row: the interpreter every
   later step uses imports torch and, where nvidia-smi sees a GPU, torch.cuda.is_available() holds
   (else one FAIL row saying why);
2. kernels: CMake + nvcc build of csrc/ when nvcc and cmake >= 3.24 are there;
3. checks: scripts/gpu_checks.py (fused kernel on the device, whole-loop and per-step graphs ==
   eager, FP16/BF16 vs FP32 at the real Wan 2.1 widths, TensorRT, GPU memory of a blended run);
4. pytest: `pytest -m "gpu or tensorrt" tests` (junit XML kept; serve tests skip without fastapi);
5. bench: scripts/gpu_bench.py at one real Wan size (480x832, 17 frames, Wan 14B/1.3B widths at
   reduced depth, stated in its report);
6. fullsize: scripts/gpu_fullsize.py, Wan 2.1 14B (40 blocks) + 1.3B (30 blocks) at 480x832x81 in
   BF16, CFG as batch 2: per-step times per engine option, the blended loop eager vs whole-loop
   graph, the 50-step projection, peak memory with its snapshot summary, Wan 2.2 for one step each.

Writes gpu-run.json and gpu-run.md (one row per step: PASS / FAIL / SKIPPED / TIMEOUT with its
reason) next to the steps' own reports in docs/gpu-runs/<date>-<gpu>/. Standard library only, so it
runs before anything is installed. Exit code 1 if any step failed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Seconds each step is planned to take on one H200, from the run of 2026-12-04 (docs/gpu-runs/2026-12-04-h200):
# install ~15 s (22 MB of wheels + editable install), kernels 10 s, checks 81 s (at --layers 2: reduced to what
# the real-size stage does not cover), pytest 29 s (+ ~15 s to collect the whole tests/ folder), bench 42 s.
# fullsize (bench/fullsize.py): both models built in 6 s; per option a 14B step 6.4 s eager / 5.4 s regional
# (first call 16.5 s) / ~4.3 s regional+FP8 (estimated: FP8 linears 1.8x at the FFN shape), a 1.3B step 1.2 s,
# warm-up + 2 timed each: ~95 s; the 3-step loop eager + graph capture + replay 56 s, again with FP8 ~45 s;
# Wan 2.2's second expert ~20 s. ~220 s, then whole-model compile (first call 110 s at 14B) with what is left.
# Each step gets its plan's share of what is left when it starts, so time a fast step leaves goes to later ones.
BUDGET_PLAN = {"install": 25, "kernels": 15, "checks": 70, "pytest": 50, "bench": 45, "fullsize": 270}
MIN_CMAKE = (3, 24)  # CMakeLists.txt's cmake_minimum_required


def run(cmd, timeout: float, log: Path, env=None) -> tuple[int | None, str]:
    """Run `cmd`, teeing its output into `log`; rc None on timeout."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        try:
            done = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=max(timeout, 1), env=env)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            f.write(out + f"\n[timed out after {timeout:.0f} s]\n")
            return None, out
        f.write(done.stdout + "\n")
    return done.returncode, done.stdout


def tail(text: str, n: int = 3) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-n:])


class Runner:
    def __init__(self, args):
        self.args, self.start, self.steps = args, time.monotonic(), []
        self.python = sys.executable
        self.out = Path(args.out) if args.out else None
        self.env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.start)

    def share(self, name: str) -> float:
        names = list(BUDGET_PLAN)
        rest = sum(BUDGET_PLAN[n] for n in names[names.index(name):])
        return max(self.left() * BUDGET_PLAN[name] / rest, 1.0)

    def record(self, name, status, reason="", **extra):
        row = {"step": name, "status": status, "reason": reason, **extra}
        self.steps.append(row)
        print(f"{name}: {status.upper()} {reason}", flush=True)
        return row

    def timed(self, name, fn):
        begun = time.monotonic()
        if self.left() < 5:
            return self.record(name, "timeout", "no time left in the budget")
        try:
            row = fn()
        except Exception as exc:  # noqa: BLE001 - a crashed step is a failed step; the run goes on
            row = self.record(name, "fail", f"{type(exc).__name__}: {exc}")
        row["seconds"] = round(time.monotonic() - begun, 1)
        return row

    # -- steps ------------------------------------------------------------------------------------
    def tools(self) -> dict:
        """Versions of the machine's tools (the interpreter row adds torch's, as the steps' interpreter sees it)."""
        info = {"python": self.python, "python_version": sys.version.split()[0]}
        for tool, flag in (("nvidia-smi", "--query-gpu=name,driver_version,memory.total"), ("nvcc", "--version"),
                           ("cmake", "--version")):
            if shutil.which(tool):
                rc, text = run([tool, flag] + (["--format=csv,noheader"] if tool == "nvidia-smi" else []), 30, self.log)
                lines = text.strip().splitlines() or [""]
                info[tool] = (lines[0] if tool == "cmake" else lines[-1]).strip() if rc == 0 else f"rc {rc}"
        return info

    def install(self) -> dict:
        if self.args.no_install:
            return self.record("install", "skipped", "--no-install: using this interpreter as it is")
        wheels = sorted(Path(self.args.wheels).glob("*.whl"))
        pip = [self.python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        if wheels:
            rc, out = run(pip + ["--no-index", "--no-deps", "--no-compile", *wheels], self.share("install"), self.log)
            if rc != 0:
                return self.record("install", "fail" if rc is not None else "timeout", f"wheels: {tail(out)}")
        rc, out = run(pip + ["--no-deps", "--no-build-isolation", "-e", "."], self.share("install"), self.log)
        how = "editable flowblend"
        if rc != 0:  # e.g. no `wheel` for an old setuptools without build isolation: the same mapping by hand
            problem = next((line.strip() for line in reversed(out.splitlines()) if "error:" in line), tail(out, 1))
            tree = Path(self.args.source_tree)
            link_package_tree(tree)
            path = [str(tree), *filter(None, self.env.get("PYTHONPATH", "").split(os.pathsep))]
            self.env["PYTHONPATH"] = os.pathsep.join(path)  # every later step runs with it
            # ... and without the working folder first on sys.path: every step runs in the checkout, whose own
            # flowblend/ folder (errors, atomic only) would shadow the tree ("flowblend is not installed")
            self.env["PYTHONSAFEPATH"] = "1"
            how = f"flowblend on PYTHONPATH by a symlink tree at {tree} (editable install failed: {problem})"
        return self.record("install", "pass", f"{len(wheels)} wheels from {self.args.wheels} + {how} into "
                           f"{self.python}" + ("" if wheels else " (no wheels: run ../shared/gpu/fetch-wheels.sh "
                                               "on a connected machine)"), python=self.python)

    def interpreter(self, gpu_seen: bool) -> dict:
        """The interpreter every later step runs imports torch and flowblend, and sees the GPU where there is one."""
        code = ("import importlib.util, json, torch; c = torch.cuda.is_available(); "
                "assert importlib.util.find_spec('flowblend.runtime'), 'flowblend is not installed'; "
                "print(json.dumps({'torch': torch.__version__, 'torch_file': torch.__file__, 'cuda': torch.version.cuda, "
                "'cuda_available': c, 'gpu': torch.cuda.get_device_name() if c else None}))")
        rc, out = run([self.python, "-c", code], 120, self.log, env=self.env)
        if rc != 0:
            return self.record("interpreter", "fail", f"{self.python} cannot import torch and flowblend: {tail(out, 1)}"
                               " (install into the interpreter that has CUDA torch; see the install row)")
        info = json.loads(out.strip().splitlines()[-1])
        self.environment.update(info)
        where = f"{self.python}: torch {info['torch']} (CUDA {info['cuda']}) from {info['torch_file']}"
        if info["cuda_available"]:
            return self.record("interpreter", "pass", f"{where} sees {info['gpu']}", **info)
        if gpu_seen:
            return self.record("interpreter", "fail", f"nvidia-smi sees a GPU but torch.cuda.is_available() is False in "
                               f"{where}: a CPU build of torch, or a venv that hides the CUDA one", **info)
        return self.record("interpreter", "skipped", f"no GPU on this machine (nvidia-smi finds none); {where}", **info)

    def kernels(self) -> dict:
        cmake, nvcc = shutil.which("cmake"), shutil.which("nvcc")
        if not (cmake and nvcc):
            return self.record("kernels", "skipped", f"needs nvcc and cmake (nvcc: {nvcc}, cmake: {cmake})")
        _, text = run([cmake, "--version"], 30, self.log)
        found = tuple(int(x) for x in re.findall(r"(\d+)\.(\d+)", text)[0]) if re.search(r"\d+\.\d+", text) else (0, 0)
        if found < MIN_CMAKE:
            return self.record("kernels", "skipped", f"cmake {found} is older than {MIN_CMAKE} (CMakeLists.txt)")
        return self.checks_step("kernels", ["--only", "kernels"], "kernels")

    def checks_step(self, name, argv, share) -> dict:
        rc, out = run([self.python, "scripts/gpu_checks.py", "--out", self.out, *argv, *self.args.checks_args],
                      self.share(share), self.log, env=self.env)
        report = self.out / "gpu-checks.json"
        rows = json.loads(report.read_text())["checks"] if report.is_file() else {}
        if report.is_file():
            report.rename(self.out / f"gpu-checks-{name}.json")
            (self.out / "gpu-checks.md").rename(self.out / f"gpu-checks-{name}.md")
        if rc is None:
            return self.record(name, "timeout", f"gpu_checks.py ran past {self.share(share):.0f} s", checks=rows)
        statuses = {r["status"] for r in rows.values()}
        status = "fail" if rc != 0 or "fail" in statuses else "pass" if "pass" in statuses else "skipped"
        reason = "; ".join(f"{k}: {r['status']}" + (f" ({r['reason']})" if r.get("reason") else "")
                           for k, r in rows.items()) or tail(out)
        return self.record(name, status, reason, checks=rows, report=f"gpu-checks-{name}.md")

    def checks(self) -> dict:
        only = [a for c in ("fused_device", "graphs", "precision", "tensorrt", "memory") for a in ("--only", c)]
        return self.checks_step("checks", only, "checks")

    def pytest(self) -> dict:
        xml = self.out / "pytest-gpu.xml"
        rc, out = run([self.python, "-m", "pytest", "-q", "-m", "gpu or tensorrt", "-rs", f"--junitxml={xml}",
                       *self.args.pytest_args], self.share("pytest"), self.log, env=self.env)
        if rc is None:
            return self.record("pytest", "timeout", f"pytest ran past {self.share('pytest'):.0f} s")
        if not xml.is_file():
            return self.record("pytest", "fail", f"no junit report (rc {rc}): {tail(out)}")
        counts, reasons = {"passed": 0, "failed": 0, "skipped": 0}, set()
        for case in ET.parse(xml).getroot().iter("testcase"):
            kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            if kind == "skipped":
                reasons.add((next(c for c in case if c.tag == "skipped").get("message") or "").strip())
            counts["failed" if kind in ("failure", "error") else kind] += 1
        status = "fail" if counts["failed"] or rc not in (0, 5) else "pass" if counts["passed"] else "skipped"
        reason = ", ".join(f"{v} {k}" for k, v in counts.items()) + (f"; skipped: {'; '.join(sorted(reasons))}"
                                                                      if reasons else "")
        return self.record("pytest", status, reason, counts=counts, report="pytest-gpu.xml")

    def fullsize(self, has_cuda: bool) -> dict:
        if not has_cuda:
            return self.record("fullsize", "skipped", "no CUDA GPU (torch.cuda.is_available() is False)")
        out = self.out / "fullsize"
        rc, text = run([self.python, "scripts/gpu_fullsize.py", "--out", out, "--budget", f"{self.share('fullsize'):.0f}",
                        *self.args.fullsize_args], self.share("fullsize") + 15, self.log, env=self.env)
        if rc is None:
            return self.record("fullsize", "timeout", f"gpu_fullsize.py ran past {self.share('fullsize'):.0f} s",
                               report="fullsize/fullsize.md")
        report = out / "fullsize.json"
        rows = json.loads(report.read_text())["stages"] if report.is_file() else {}
        statuses = {r["status"] for r in rows.values()}
        status = "fail" if rc not in (0, 3) or "fail" in statuses else "pass" if "pass" in statuses else "skipped"
        reason = "; ".join(f"{k}: {r['status']}" for k, r in rows.items()) or tail(text)
        return self.record("fullsize", status, reason, stages=rows, report="fullsize/fullsize.md")

    def bench(self, has_cuda: bool) -> dict:
        if not has_cuda:
            return self.record("bench", "skipped", "no CUDA GPU (torch.cuda.is_available() is False)")
        out = self.out / "bench"
        rc, text = run([self.python, "scripts/gpu_bench.py", "--out", out, *self.args.bench_args],
                       self.share("bench"), self.log, env=self.env)
        if rc is None:
            return self.record("bench", "timeout", f"gpu_bench.py ran past {self.share('bench'):.0f} s")
        if rc == 3:
            return self.record("bench", "skipped", tail(text, 1))
        return self.record("bench", "pass" if rc == 0 else "fail", tail(text, 2), report="bench/gpu-bench.md")

    # -- the run ----------------------------------------------------------------------------------
    def main(self) -> int:
        gpu = "cpu"
        if shutil.which("nvidia-smi"):
            done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True)
            gpu = (done.stdout.strip().splitlines() or ["gpu"])[0] if done.returncode == 0 else "gpu"
        slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
        if self.out is None:
            self.out = ROOT / "docs" / "gpu-runs" / f"{datetime.date.today().isoformat()}-{slug}"
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "gpu-run.log"
        self.log.write_text("")
        self.environment = self.tools()
        self.timed("install", self.install)
        row = self.timed("interpreter", lambda: self.interpreter(gpu_seen=gpu != "cpu"))
        has_cuda = bool(row.get("cuda_available"))
        self.timed("kernels", self.kernels)
        self.timed("checks", self.checks)
        self.timed("pytest", self.pytest)
        self.timed("bench", lambda: self.bench(has_cuda))
        self.timed("fullsize", lambda: self.fullsize(has_cuda))
        report = {"environment": self.environment, "budget_s": self.args.budget, "budget_plan_s": BUDGET_PLAN,
                  "wall_s": round(time.monotonic() - self.start, 1), "steps": self.steps,
                  "command": " ".join(["python3 scripts/gpu_run.py", *sys.argv[1:]])}
        (self.out / "gpu-run.json").write_text(json.dumps(report, indent=2, default=str))
        (self.out / "gpu-run.md").write_text(markdown(report))
        print(f"wrote {self.out / 'gpu-run.md'} ({report['wall_s']:.0f} s)")
        return 1 if any(s["status"] == "fail" for s in self.steps) else 0


def link_package_tree(tree: Path) -> None:
    """pyproject's package-dir mapping as symlinks under `tree` (a folder to put on PYTHONPATH)."""
    import tomllib

    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "flowblend").mkdir(parents=True)
    for package, folder in mapping.items():
        if package == "flowblend":
            for item in (ROOT / folder).iterdir():
                (tree / "flowblend" / item.name).symlink_to(item)
        else:
            (tree / "flowblend" / package.split(".", 1)[1]).symlink_to(ROOT / folder)


def markdown(report: dict) -> str:
    lines = ["# flowblend GPU run", "", f"`{report['command']}`: {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s "
             "budget", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["environment"].items()]
    lines += ["", "| step | status | seconds | reason / report |", "|---|---|---|---|"]
    for s in report["steps"]:
        link = f" ([{s['report']}]({s['report']}))" if s.get("report") else ""
        lines.append(f"| {s['step']} | {s['status'].upper()} | {s.get('seconds', 0):.1f} | "
                     f"{s['reason'].replace('|', '/')}{link} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="report folder (default docs/gpu-runs/<date>-<gpu>)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 8 minutes)")
    p.add_argument("--no-install", action="store_true", help="use this interpreter as it is (no wheels, no editable "
                   "install)")
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of the copied wheels (default .whl/)")
    p.add_argument("--source-tree", default="/tmp/flowblend-src",
                   help="where flowblend's package tree is linked if the editable install fails (put on PYTHONPATH)")
    p.add_argument("--checks-args", nargs="*", default=["--layers", "2", "--steps", "10", "--reps", "2"],
                   help="extra arguments for scripts/gpu_checks.py")
    p.add_argument("--pytest-args", nargs="*", default=["tests"], help="paths/options for pytest")
    p.add_argument("--bench-args", nargs="*", default=["--dtype", "bf16", "--frames", "17", "--steps", "10",
                                                       "--layers-large", "4", "--layers-small", "4", "--backend",
                                                       "torch", "--repeats", "2"],
                   help="arguments for scripts/gpu_bench.py (one real Wan size)")
    p.add_argument("--fullsize-args", nargs="*", default=[], help="extra arguments for scripts/gpu_fullsize.py")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(Runner(parse_args()).main())
