"""ONNX graph vs the PyTorch module it came from, on the same seeded inputs at several timesteps.

The reference is always the FP32 PyTorch module, so an FP16/BF16 graph is judged by how far it
drifts from full precision, not from its own reduced-precision twin.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from flowblend.engines.base import FlowblendError
from flowblend.engines.iospec import IOSpec
from flowblend.engines.signature import signature_for

TIMESTEPS = (999.0, 500.0, 50.0)
THRESHOLDS = {"fp32": 0.99999, "fp16": 0.999, "bf16": 0.999}


@dataclass
class Comparison:
    timestep: float
    cosine: float
    max_abs: float
    max_rel: float  # max |a - b| / max |b|
    nonfinite: int

    @classmethod
    def of(cls, timestep: float, candidate: np.ndarray, reference: np.ndarray) -> "Comparison":
        a, b = candidate.astype(np.float64).ravel(), reference.astype(np.float64).ravel()
        finite = np.isfinite(a)
        nonfinite = int((~finite).sum())
        a = np.where(finite, a, 0.0)
        cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
        max_abs = float(np.abs(a - b).max())
        return cls(timestep, cos, max_abs, max_abs / max(float(np.abs(b).max()), 1e-30), nonfinite)


@dataclass
class VerifyReport:
    model: str
    dtype: str
    threshold: float
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def min_cosine(self) -> float:
        return min(c.cosine for c in self.comparisons)

    @property
    def passed(self) -> bool:
        return self.min_cosine >= self.threshold and all(c.nonfinite == 0 for c in self.comparisons)

    def summary(self) -> str:
        worst = min(self.comparisons, key=lambda c: c.cosine)
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict} {self.model} [{self.dtype}]: min cosine {self.min_cosine:.7f} (threshold {self.threshold}), "
                f"max abs err {max(c.max_abs for c in self.comparisons):.3e}, max rel err "
                f"{max(c.max_rel for c in self.comparisons):.3e}, NaN/Inf {sum(c.nonfinite for c in self.comparisons)} "
                f"(worst at t={worst.timestep:g})")

    def to_dict(self) -> dict:
        return {"model": self.model, "dtype": self.dtype, "threshold": self.threshold, "passed": self.passed,
                "min_cosine": self.min_cosine, "comparisons": [asdict(c) for c in self.comparisons]}


def ort_session(path: str | Path, providers=None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def verify_onnx(path: str | Path, transformer: torch.nn.Module, spec: IOSpec, timesteps=TIMESTEPS, seed: int = 0,
                **signature_kwargs) -> VerifyReport:
    """Compare the graph at `path` with the FP32 PyTorch module at each timestep."""
    try:
        session = ort_session(path)
    except Exception as exc:  # noqa: BLE001 - ORT raises several types; all mean "cannot run this graph here"
        raise FlowblendError(f"ONNX Runtime cannot load {path} ({spec.dtype}): {exc}") from exc
    reference = signature_for(torch.nn.Module.float(copy.deepcopy(transformer)), **signature_kwargs).eval()
    report = VerifyReport(Path(path).stem, spec.dtype, THRESHOLDS[spec.dtype])
    for t in timesteps:
        inputs = spec.sample_inputs(seed=seed, timestep=t)
        feeds = {name: x.numpy() if x.dtype != torch.bfloat16 else x.float().numpy()
                 for name, x in zip(spec.input_names, inputs)}
        try:
            out = session.run(None, feeds)[0]
        except Exception as exc:  # noqa: BLE001
            raise FlowblendError(f"ONNX Runtime failed to run {path} ({spec.dtype}): {exc}") from exc
        with torch.no_grad():
            ref = reference(*[x.float() if x.is_floating_point() else x for x in inputs]).float().numpy()
        report.comparisons.append(Comparison.of(t, out.astype(np.float32), ref))
    return report
