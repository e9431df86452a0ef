"""An exported graph against the PyTorch module it came from, on the same seeded inputs at several timesteps.

The reference is always the FP32 PyTorch module, so an FP16/BF16 graph is judged by how far it
drifts from full precision, not from its own reduced-precision twin. The graph runs in ONNX
Runtime through OrtEngine (the backend the runtime uses), except BF16 on a CPU-only machine: ORT's
CPU provider has no BF16 kernels, so there onnx's reference evaluator runs it. Cosine similarity
and max abs error come from polygraphy's comparators; a dynamic-profile export is checked at its
min, opt and max shapes.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from flowblend.engines.base import TIMESTEP, VELOCITY
from flowblend.engines.iospec import IOSpec
from flowblend.engines.signature import signature_for
from flowblend.errors import FlowblendError

from .record import checked_export

TIMESTEPS = (999.0, 500.0, 50.0)
THRESHOLDS = {"fp32": 0.99999, "fp16": 0.999, "bf16": 0.999}  # min cosine; NaN/Inf always fails


def _polygraphy_metrics(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(cosine similarity, max abs difference) by polygraphy's comparators, quietly."""
    from polygraphy.comparator import IterationResult
    from polygraphy.comparator.compare import CosineSimilarityCompareFunc, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    a = IterationResult({VELOCITY: candidate}, runner_name="candidate")
    b = IterationResult({VELOCITY: reference}, runner_name="reference")
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        cosine = CosineSimilarityCompareFunc(cosine_similarity_threshold=-1.0)(a, b)[VELOCITY].cosine_similarity
        simple = SimpleCompareFunc(check_error_stat="max", atol=math.inf, rtol=math.inf)(a, b)[VELOCITY]
    return float(cosine), float(simple.max_absdiff)


@dataclass
class Comparison:
    timestep: float
    cosine: float
    max_abs: float
    max_rel: float  # max |candidate - reference| / max |reference|
    nonfinite: int  # NaN/Inf values in the candidate
    shape: str = "opt"  # profile point: min | opt | max

    @classmethod
    def of(cls, timestep: float, candidate: np.ndarray, reference: np.ndarray, shape: str = "opt") -> "Comparison":
        candidate = np.ascontiguousarray(candidate, dtype=np.float32)
        reference = np.ascontiguousarray(reference, dtype=np.float32)
        nonfinite = int((~np.isfinite(candidate)).sum())
        cosine, max_abs = _polygraphy_metrics(candidate, reference)
        scale = max(float(np.abs(reference).max()), 1e-30)
        return cls(float(timestep), cosine, max_abs, max_abs / scale, nonfinite, shape)


@dataclass
class VerifyReport:
    model: str
    dtype: str
    threshold: float
    comparisons: list[Comparison] = field(default_factory=list)
    runner: str = "onnxruntime"

    @property
    def min_cosine(self) -> float:
        cosines = [c.cosine for c in self.comparisons]
        return float("nan") if any(math.isnan(c) for c in cosines) else min(cosines)

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and self.min_cosine >= self.threshold and \
            all(c.nonfinite == 0 for c in self.comparisons)

    def summary(self) -> str:
        worst = min(self.comparisons, key=lambda c: c.cosine if not math.isnan(c.cosine) else -2.0)
        return (f"{'PASS' if self.passed else 'FAIL'} {self.model} [{self.dtype}, {self.runner}]: min cosine "
                f"{self.min_cosine:.7f} (threshold {self.threshold}), max abs err "
                f"{max(c.max_abs for c in self.comparisons):.3e}, max rel err "
                f"{max(c.max_rel for c in self.comparisons):.3e}, NaN/Inf {sum(c.nonfinite for c in self.comparisons)} "
                f"(worst at t={worst.timestep:g}, {worst.shape} shape)")

    def to_dict(self) -> dict:
        return {"model": self.model, "dtype": self.dtype, "runner": self.runner, "threshold": self.threshold,
                "passed": self.passed, "min_cosine": self.min_cosine,
                "max_abs": max(c.max_abs for c in self.comparisons),
                "comparisons": [asdict(c) for c in self.comparisons]}


def profile_points(spec: IOSpec) -> dict[str, IOSpec]:
    """Static specs at each point of the profile: {"opt"} for a static export, min/opt/max otherwise."""
    points = {"opt": IOSpec(spec.batch, spec.latent, spec.text_len, spec.text_dim, spec.dtype, spec.with_mask)}
    if not spec.static:
        for which in ("min", "max"):
            latent = spec.shapes(which)["latents"][1:]
            points[which] = IOSpec(spec.batch, latent, spec.text_len, spec.text_dim, spec.dtype, spec.with_mask)
    return points


def graph_runner(path: str | Path, spec: IOSpec, device: str = "cpu") -> tuple[str, Callable]:
    """(runner name, run(inputs) -> velocity ndarray) for the graph at `path`."""
    if spec.dtype == "bf16" and torch.device(device).type == "cpu":
        return "onnx-reference (ORT's CPU provider has no BF16 kernels)", _reference_evaluator(path, spec)
    from flowblend.engines.ort_engine import OrtEngine

    engine = OrtEngine(path, device=device, name=Path(path).stem)

    def run(inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
        tensors = {name: x.to(device).contiguous() for name, x in zip(spec.input_names, inputs)}
        tensors[TIMESTEP] = tensors[TIMESTEP][None]  # a one-row timestep table
        tensors[VELOCITY] = torch.empty_like(tensors["latents"])
        engine.bind(tensors)
        engine.run(0)
        return tensors[VELOCITY].float().cpu().numpy()

    return "onnxruntime", run


def _reference_evaluator(path: str | Path, spec: IOSpec) -> Callable:
    import ml_dtypes
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path))

    def run(inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
        feeds = {name: x.float().numpy().astype(ml_dtypes.bfloat16) if x.dtype == torch.bfloat16 else x.numpy()
                 for name, x in zip(spec.input_names, inputs)}
        return np.asarray(evaluator.run(None, feeds)[0]).astype(np.float32)

    return run


def fp32_reference(transformer: torch.nn.Module, **signature_kwargs) -> torch.nn.Module:
    """The FP32 signature module of a transformer (copied only if it is not FP32 already)."""
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in transformer.state_dict().values()):
        transformer = torch.nn.Module.float(copy.deepcopy(transformer))
    return signature_for(transformer, **signature_kwargs).eval()


def verify_onnx(path: str | Path, transformer: torch.nn.Module, spec: IOSpec, timesteps=TIMESTEPS, seed: int = 0,
                device: str = "cpu", **signature_kwargs) -> VerifyReport:
    """Compare the graph at `path` with the FP32 PyTorch module at each timestep and profile point."""
    runner, run = graph_runner(path, spec, device)
    reference = fp32_reference(transformer, **signature_kwargs)
    report = VerifyReport(Path(path).stem, spec.dtype, THRESHOLDS[spec.dtype], runner=runner)
    for point, point_spec in profile_points(spec).items():
        for t in timesteps:
            inputs = point_spec.sample_inputs(seed=seed, timestep=t)
            try:
                out = run(inputs)
            except FlowblendError:
                raise
            except Exception as exc:  # noqa: BLE001 - ORT/onnx raise many types; all mean "cannot run it"
                raise FlowblendError(f"{runner} failed to run {path} ({spec.dtype}, {point} shape): "
                                     f"{str(exc).strip()}") from exc
            with torch.no_grad():
                ref = reference(*[x.float() if x.is_floating_point() else x for x in inputs]).float().numpy()
            report.comparisons.append(Comparison.of(t, out, ref, point))
    return report


def verify_export(artifacts: str | Path, loaded_pair, device: str = "cpu",
                  checked: tuple | None = None) -> list[VerifyReport]:
    """`flowblend verify`: every graph of a pair's export (hash-checked first) against the loaded pair.

    `checked` is checked_export's answer when the caller already has it (hashing a big export takes a while).
    """
    record, spec, directory = checked or checked_export(artifacts, loaded_pair.family.name)
    missing = sorted(set(record["models"]) - set(loaded_pair.transformers))
    if missing:
        raise FlowblendError(f"the export has graphs {missing} the loaded pair lacks (it has "
                             f"{sorted(loaded_pair.transformers)}): pass the same --large/--small as at export")
    return [verify_onnx(directory / entry["file"], loaded_pair.transformers[name], spec, device=device)
            for name, entry in record["models"].items()]
