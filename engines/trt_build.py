"""ONNX -> TensorRT plan with the TensorRT Python API (called by engines/build.py through the store).

Written against TensorRT 10/11 (`build_serialized_network`, strongly typed networks, name-based
profiles); tensorrt is imported only when a build runs. The CPU tests drive it through a
recording stand-in (tests/fake_tensorrt.py); a GPU machine runs the real thing (tests/test_gpu.py).

Precision comes from the export, not from builder flags: export/onnx.py writes the graph in the
target dtype with explicit FP32 islands (norms, modulation, time embedding), and a STRONGLY_TYPED
network keeps exactly those types (weak typing with FP16/BF16 flags is deprecated since TensorRT
10.12 and gone in 11). TF32 is switched off: FP32 tensors (a whole FP32 export, or the FP32 islands
of an FP16/BF16 one) stay FP32, as the ONNX graph that passed its check computed them.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock

from flowblend.atomic import write_atomic
from flowblend.errors import FlowblendError

from .iospec import IOSpec
from .trt_engine import import_tensorrt

TIMING_CACHE_NAME = "timing.cache"
OPT_LEVELS = range(0, 6)


def optimization_profile(export_record: dict) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """{input name: (min, opt, max)} from an export record (export.json): the plan's one profile."""
    spec = IOSpec.from_dict(export_record["spec"])
    profile = spec.profile()
    for name, (lo, opt, hi) in profile.items():
        if not all(0 < a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise FlowblendError(f"export profile of {name!r} is not min <= opt <= max: {lo}, {opt}, {hi}; re-export")
    return profile


@dataclass(frozen=True)
class BuildSettings:
    """Every builder choice for one plan (what a rebuild must repeat to get the same engine)."""

    profile: dict
    opt_level: int = 3
    workspace_bytes: int = 8 << 30
    strongly_typed: bool = True
    tf32: bool = False

    def describe(self) -> dict:
        return {"opt_level": self.opt_level, "workspace_bytes": self.workspace_bytes,
                "strongly_typed": self.strongly_typed, "tf32": self.tf32,
                "profile": {n: [list(s) for s in shapes] for n, shapes in self.profile.items()}}


def build_settings(spec: IOSpec, opt_level: int = 3, workspace_gib: float = 8.0) -> BuildSettings:
    """Settings for an export's spec; FlowblendError on options TensorRT would reject later."""
    if opt_level not in OPT_LEVELS:
        raise FlowblendError(f"--opt-level must be 0..5 (TensorRT builder optimization level), got {opt_level}")
    if not workspace_gib > 0:
        raise FlowblendError(f"--workspace-gib must be > 0, got {workspace_gib}")
    return BuildSettings(profile=optimization_profile({"spec": spec.to_dict()}), opt_level=opt_level,
                         workspace_bytes=int(workspace_gib * (1 << 30)), strongly_typed=True, tf32=False)


# -- progress -----------------------------------------------------------------------------------
def progress_monitor(trt, stream=None):
    """A trt.IProgressMonitor drawing one tqdm bar per builder phase (on stderr); None where TensorRT has none."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None
    from tqdm.auto import tqdm

    stream = stream or sys.stderr

    class BuildProgress(base):
        # TensorRT calls these from its own threads: one lock around the bars
        def __init__(self):
            base.__init__(self)
            self._lock = threading.Lock()
            self._bars = {}
            self.phases = []

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                self.phases.append(phase_name)
                depth = len(self._bars)
                self._bars[phase_name] = tqdm(total=num_steps, desc=("  " * depth) + phase_name, position=depth,
                                              leave=depth == 0, file=stream, unit="step")

        def step_complete(self, phase_name, step):
            with self._lock:
                bar = self._bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)
            return True  # never cancel the build

        def phase_finish(self, phase_name):
            with self._lock:
                bar = self._bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return BuildProgress()


# -- timing cache -------------------------------------------------------------------------------


def attach_timing_cache(config, path: Path):
    """Start the build from the cache file of this GPU/TensorRT (next to its engines), or an empty one."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, False):
        # unreadable or from another setup: it would only cost time, never correctness, so start fresh
        print(f"flowblend build: ignoring unusable timing cache {path}", file=sys.stderr)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def save_timing_cache(config, path: Path) -> None:
    """Merge this build's timings into the cache file (others may have written it since we read it)."""
    with FileLock(str(path.with_name(f".{path.name}.lock"))):
        ours = config.get_timing_cache()
        if path.is_file():
            theirs = config.create_timing_cache(path.read_bytes())
            if theirs is not None:
                ours.combine(theirs, True)
        write_atomic(path, bytes(ours.serialize()))


# -- build --------------------------------------------------------------------------------------
def _parse(trt, builder, logger, onnx_path: Path, settings: BuildSettings):
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if settings.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weight data resolves
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FlowblendError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors or 'no details'}; re-export it "
                             "with `flowblend export` (opset 18) or report the failing op")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if inputs != set(settings.profile):
        raise FlowblendError(f"{onnx_path} has inputs {sorted(inputs)} but its export record names "
                             f"{sorted(settings.profile)}; re-export the pair")
    return network, parser


def _configure(trt, builder, settings: BuildSettings):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.opt_level
    if not settings.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in settings.profile.items():
        profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(profile) < 0:
        raise FlowblendError(f"TensorRT rejected the optimization profile {settings.describe()['profile']}")
    return config


def build_plan_bytes(onnx_path: str | Path, settings: BuildSettings, timing_cache: Path | None = None,
                     progress: bool = True) -> bytes:
    """Parse, configure and build one plan; FlowblendError with the reason if TensorRT cannot."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, parser = _parse(trt, builder, logger, Path(onnx_path), settings)  # the parser owns the weights: keep it
    config = _configure(trt, builder, settings)
    if timing_cache is not None:
        attach_timing_cache(config, timing_cache)
    monitor = progress_monitor(trt) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor  # must outlive the build: held by `monitor` until we return
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FlowblendError(f"TensorRT could not build {onnx_path} (its log above says why); if it ran out of memory "
                             "raise --workspace-gib or lower --opt-level")
    if timing_cache is not None:
        save_timing_cache(config, timing_cache)
    return bytes(serialized)


def build_plan_file(onnx_path: str | Path, spec: IOSpec, out_path: str | Path, opt_level: int = 3,
                    workspace_gib: float = 8.0, verify: Callable | None = None, phase_progress: bool = True,
                    timing_cache: str | Path | None = None) -> BuildSettings:
    """Build `onnx_path` into `out_path` (the store's temp file) and check it before the store accepts it.

    `verify(onnx_path, plan_path)` returns a report with `.passed` and `.summary()` (cosine >= 0.999 and no
    NaN/Inf against the FP32 PyTorch model, see cli/build_cmd.py); a failed check raises, so the store
    discards the file. The timing cache defaults to `timing.cache` in the plan's folder, which the
    store keys by GPU and TensorRT version, so every build on this GPU shares it. `phase_progress`
    draws TensorRT's builder phases (they take minutes at real sizes).
    """
    out_path = Path(out_path)
    settings = build_settings(spec, opt_level, workspace_gib)
    cache = Path(timing_cache) if timing_cache is not None else out_path.parent / TIMING_CACHE_NAME
    out_path.write_bytes(build_plan_bytes(onnx_path, settings, cache, phase_progress))
    if verify is not None:
        report = verify(Path(onnx_path), out_path)
        if not report.passed:
            raise FlowblendError(f"the TensorRT engine built from {Path(onnx_path).name} failed its check against "
                                 f"PyTorch and was not stored: {report.summary()}; try an export in bf16 or fp32")
    return settings
