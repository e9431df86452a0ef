"""An exported graph against the PyTorch module it came from, on the same seeded inputs at several timesteps.

The reference is always the FP32 PyTorch module, so an FP16/BF16 graph is judged by how far it
drifts from full precision, not from its own reduced-precision twin. The graph runs in ONNX
Runtime through OrtEngine (the backend the runtime uses), except BF16 on a CPU-only machine: ORT's
CPU provider has no BF16 kernels, so there onnx's reference evaluator runs it. Cosine similarity
and max abs error come from polygraphy's comparators; a dynamic-profile export is checked at its
min, opt and max shapes.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from flowblend.errors import FlowblendError

from ..engines.base import TIMESTEP, VELOCITY
from ..engines.iospec import IOSpec
from ..engines.kinds import PRECISIONS, precision
from ..engines.signature import signature_for
from .precision import layout_dtype
from .record import check_external_data, checked_export
from .trace import TWIN_UNSHARED, traceable

TIMESTEPS = (999.0, 500.0, 50.0)
THRESHOLDS = {name: p.min_cosine for name, p in PRECISIONS.items()}  # min cosine; NaN/Inf always fails
UNOPTIMIZED = "CPU, graph optimizations off"
ATTENTION_BUDGET = 1 << 30  # above this many bytes of attention scores, a reduced-shape twin runs instead
DTYPE_LABEL = {p.torch_dtype: p.label for p in PRECISIONS.values() if p.fp32_islands and p.exportable}
# Ops that only move shapes around: their counts may differ between two static shapes of one graph.
SHAPE_OPS = {"Reshape", "Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Constant", "Expand",
             "Range", "Transpose", "Split", "Identity"}


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
    shape: str = "opt"  # profile point: min | opt | max | twin
    latent: str = ""  # the latent frames/height/width compared, e.g. f2h6w8

    @classmethod
    def of(cls, timestep: float, candidate: np.ndarray, reference: np.ndarray, shape: str = "opt",
           latent: str = "") -> "Comparison":
        candidate = np.ascontiguousarray(candidate, dtype=np.float32)
        reference = np.ascontiguousarray(reference, dtype=np.float32)
        nonfinite = int((~np.isfinite(candidate)).sum())
        cosine, max_abs = _polygraphy_metrics(candidate, reference)
        scale = max(float(np.abs(reference).max()), 1e-30)
        return cls(float(timestep), cosine, max_abs, max_abs / scale, nonfinite, shape, latent)


@dataclass
class VerifyReport:
    model: str
    dtype: str
    threshold: float
    comparisons: list[Comparison] = field(default_factory=list)
    runner: str = "onnxruntime"
    graph: str = "the written graph"  # what ran: the written graph, or a reduced-shape twin of it
    reference: str = "FP32 PyTorch module"
    structure_ok: bool = True  # a twin matched the written graph's weights, ops and casts

    @property
    def min_cosine(self) -> float:
        cosines = [c.cosine for c in self.comparisons]
        return float("nan") if any(math.isnan(c) for c in cosines) else min(cosines)

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and self.structure_ok and self.min_cosine >= self.threshold and \
            all(c.nonfinite == 0 for c in self.comparisons)

    def summary(self) -> str:
        worst = min(self.comparisons, key=lambda c: c.cosine if not math.isnan(c.cosine) else -2.0)
        return (f"{'PASS' if self.passed else 'FAIL'} {self.model} [{self.dtype}, {self.runner}]: min cosine "
                f"{self.min_cosine:.7f} (threshold {self.threshold}), max abs err "
                f"{max(c.max_abs for c in self.comparisons):.3e}, max rel err "
                f"{max(c.max_rel for c in self.comparisons):.3e}, NaN/Inf {sum(c.nonfinite for c in self.comparisons)} "
                f"(worst at t={worst.timestep:g}, {worst.shape} shape {worst.latent}); ran {self.graph}, "
                f"against the {self.reference}")

    def to_dict(self) -> dict:
        return {"model": self.model, "dtype": self.dtype, "runner": self.runner, "threshold": self.threshold,
                "graph": self.graph, "reference": self.reference, "structure_ok": self.structure_ok,
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
    on_cpu = precision(spec.dtype).onnxruntime_cpu if torch.device(device).type == "cpu" else "session"
    if on_cpu == "reference":
        return (f"onnx-reference (ORT's CPU provider has no {precision(spec.dtype).label} kernels)",
                _reference_evaluator(path, spec))
    if on_cpu == "unoptimized":
        return f"onnxruntime ({UNOPTIMIZED})", _unoptimized_session(path, spec)
    from ..engines.ort_engine import OrtEngine

    engine = OrtEngine(path, device=device, name=Path(path).stem)

    def run(inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
        tensors = {name: x.to(device).contiguous() for name, x in zip(spec.input_names, inputs)}
        tensors[TIMESTEP] = tensors[TIMESTEP][None]  # a one-row timestep table
        tensors[VELOCITY] = torch.empty_like(tensors["latents"])
        engine.bind(tensors)
        engine.run(0)
        return tensors[VELOCITY].float().cpu().numpy()

    return "onnxruntime", run


def _unoptimized_session(path: str | Path, spec: IOSpec) -> Callable:
    """ORT's CPU provider lacks FP16 kernels for many ops: it wraps them in Casts to FP32 (always, at any
    optimization level) and drops the Cast pairs between neighbours, so inside such a chain an FP16 value
    is held in FP32 and an overflow there can go unseen on the CPU (the graph's own explicit Casts, which
    our mixed-precision regions are bounded by, stay). With graph optimizations off ORT at least does not
    constant-fold FP32 copies of the FP16 weights, which would double the check's memory."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_cpu_mem_arena = False  # a one-off check: nothing to gain from keeping freed activations
    # nor from prepacked copies of the weights (MLAS packs the constant weights of FP32 Gemms, the islands'
    # time embedding and projection, at session start: +0.7 GiB resident for the 1-layer real-width Wan 14B
    # twin, whose .data is 1.4 GiB)
    opts.add_session_config_entry("session.disable_prepacking", "1")
    # The Casts ORT inserts to run FP16 MatMuls in FP32 take only initializers: in the default order they
    # run first and every weight's FP32 copy is alive at once (2x the FP16 weights; 1.1 GiB on that twin);
    # priority-based order runs each beside its consumer (0.4 GiB there)
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
        feeds = {name: x.numpy() for name, x in zip(spec.input_names, inputs)}
        return np.asarray(session.run([VELOCITY], feeds)[0]).astype(np.float32)

    return run


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
    """The FP32 signature module of a transformer that is not in an export layout (copied only if it is not FP32)."""
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in transformer.state_dict().values()):
        transformer = torch.nn.Module.float(copy.deepcopy(transformer))
    return signature_for(transformer, **signature_kwargs).eval()


@contextlib.contextmanager
def reference_module(transformer: torch.nn.Module, **signature_kwargs):
    """(module, what it is): the FP32 model itself, or for a model loaded in a low-precision export layout
    the FP32 computation of its own weights (each region upcast for its call; no copy of the model)."""
    dtype = layout_dtype(transformer)
    if dtype is None:
        yield fp32_reference(transformer, **signature_kwargs), "FP32 PyTorch module"
        return
    with traceable(transformer, dtype, reference=True, **signature_kwargs) as module:
        yield module, f"FP32 computation of the {DTYPE_LABEL.get(dtype, dtype)} export layout's weights"


def attention_bytes(transformer: torch.nn.Module, spec: IOSpec) -> int:
    """Bytes of one attention-score tensor [B, heads, N, N] in FP32 at the largest profile point:
    what ONNX Runtime materialises (the opset-18 graph has no fused attention)."""
    from diffusers.configuration_utils import ConfigMixin

    heads = transformer.config.get("num_attention_heads", 1) if isinstance(transformer, ConfigMixin) else 1
    _, _, f, h, w = spec.shapes("max")["latents"]
    tokens = (f // spec.patch[0]) * (h // spec.patch[1]) * (w // spec.patch[2])
    return spec.batch * heads * tokens * tokens * 4


def twin_spec(spec: IOSpec) -> IOSpec:
    """The reduced shape a twin is traced at: the same batch, channels, text and dtype, a few tokens per axis."""
    c, f, h, w = spec.latent
    pt, ph, pw = spec.patch
    return IOSpec(spec.batch, (c, min(f, 2 * pt), min(h, 6 * ph), min(w, 8 * pw)), spec.text_len, spec.text_dim,
                  spec.dtype, spec.with_mask, patch=spec.patch)


def _grid(spec: IOSpec) -> str:
    _, _, f, h, w = spec.shapes("opt")["latents"]
    return f"f{f}h{h}w{w}"


def verify_onnx(path: str | Path, transformer: torch.nn.Module, spec: IOSpec, timesteps=TIMESTEPS, seed: int = 0,
                device: str = "cpu", twin: bool | None = None, before_run: Callable[[], None] | None = None,
                **signature_kwargs) -> VerifyReport:
    """Compare the graph at `path` with the FP32 reference at each timestep and profile point.

    twin=None decides by size: the written graph runs itself when its attention scores fit in
    ATTENTION_BUDGET bytes, else a twin traced from the same module at twin_spec's shape runs, after
    a structural match with the written graph (same weights, ops and casts).

    One model in memory at a time: the twin is traced and the reference outputs computed first, then
    `before_run` is called (export_pair frees the PyTorch model's weights there: nothing below reads
    them), and only then does the graph's session exist.
    """
    path = Path(path)
    check_external_data(path)
    if twin is None:
        twin = attention_bytes(transformer, spec) > ATTENTION_BUDGET
    points, graph, note, mismatch = profile_points(spec), path, "the written graph", ""
    try:
        if twin:
            from .trace import export_transformer

            small = twin_spec(spec)
            graph = path.with_name(f"{path.stem}.twin.onnx")
            export_transformer(transformer, small, graph, twin_of=path, **signature_kwargs)
            mismatch = structure_mismatch(path, graph)
            points = {"twin": small}
            note = (f"a twin traced from the same module at {small.key()} (written graph at {spec.key()}"
                    f"{': STRUCTURE DIFFERS: ' + mismatch if mismatch else ', same weights, ops and casts'})")
        references = {}  # computed before the graph's session exists, so the two never hold memory at once
        with reference_module(transformer, **signature_kwargs) as (reference, what), torch.no_grad():
            for point, point_spec in points.items():
                for t in timesteps:
                    inputs = point_spec.sample_inputs(seed=seed, timestep=t)
                    references[point, t] = reference(*[x.float() if x.is_floating_point() else x
                                                       for x in inputs]).float().numpy()
        if before_run is not None:
            before_run()
        runner, run = graph_runner(graph, spec, device)
        report = VerifyReport(path.stem, spec.dtype, THRESHOLDS[spec.dtype], runner=runner, graph=note,
                              reference=what, structure_ok=not mismatch)
        for point, point_spec in points.items():
            for t in timesteps:
                try:
                    out = run(point_spec.sample_inputs(seed=seed, timestep=t))
                except FlowblendError:
                    raise
                except Exception as exc:  # noqa: BLE001 - ORT/onnx raise many types; all mean "cannot run it"
                    raise FlowblendError(f"{runner} failed to run {graph} ({spec.dtype}, {point} shape): "
                                         f"{str(exc).strip()}") from exc
                report.comparisons.append(Comparison.of(t, out, references[point, t], point, _grid(point_spec)))
        del run
        return report
    finally:
        if graph != path:
            graph.unlink(missing_ok=True)


def structure_mismatch(written: Path, twin: Path) -> str:
    """'' if the twin has the written graph's weights (names, dtypes, shapes, bytes by reference), op
    counts and Cast targets; else what differs. Shape-only plumbing (Reshape constants) may differ."""
    import onnx

    a, b = (onnx.load(str(p), load_external_data=False) for p in (written, twin))
    unshared = [n for p in b.metadata_props if p.key == TWIN_UNSHARED for n in p.value.split(",") if n]
    if unshared:
        return (f"{len(unshared)} weights of the module differ from the written .data (same dtype and shape, other "
                f"bytes), e.g. {unshared[:3]}")
    weights = [_module_weights(m) for m in (a, b)]
    if weights[0] != weights[1]:
        differ = sorted(k for k in set(weights[0]) | set(weights[1]) if weights[0].get(k) != weights[1].get(k))
        return f"{len(differ)} module weights differ, e.g. {differ[:3]}"
    for what, count in (("ops", _op_counts), ("casts", _cast_counts)):
        x, y = count(a), count(b)
        if x != y:
            diff = {k: (x.get(k, 0), y.get(k, 0)) for k in set(x) | set(y) if x.get(k, 0) != y.get(k, 0)}
            return f"{what} differ (written, twin): {dict(sorted(diff.items(), key=str)[:4])}"
    return ""


def _module_weights(model) -> dict:
    """{name: (dtype, dims, where its bytes are)} of the initializers named after module parameters (dotted
    paths; constants the exporter folds are named val_N, cat_N, ...)."""
    from .record import external_references

    refs = {r.name: (r.location, r.offset, r.length) for r in external_references(model)}
    return {t.name: (t.data_type, tuple(t.dims), refs.get(t.name)) for t in model.graph.initializer if "." in t.name}


def _op_counts(model) -> dict:
    return dict(Counter(n.op_type for n in model.graph.node if n.op_type not in SHAPE_OPS))


def _cast_counts(model) -> dict:
    import onnx

    return dict(Counter(onnx.helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "Cast"
                        for a in n.attribute if a.name == "to"))


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
