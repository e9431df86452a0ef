"""The fused step kernel (csrc/fused_step.cu) for the sampler, loaded with ctypes when it is built.

A step of the PyTorch path is the CFG combine, each solver Combine and the cast into the model
input: 4 to 8 elementwise launches over the whole latent. The kernel does all of it in one pass.
It is an optimisation only: the PyTorch ops in runtime/sampler.py stay the reference and the
fallback (CPU, or no library built: `cmake -S . -B build && cmake --build build`).

The per-step arguments (pointers into the sampler's static buffers, the step's Combine table) are
packed once per buffer set, so a step is one ctypes call on the current CUDA stream: capturable in
a CUDA graph, and the graph keeps its own copy of the arguments.

The library links the CUDA runtime of the toolkit that built it, statically (CMakeLists.txt); a
toolkit newer than the driver (nvcc 13 needs a driver >= 580) builds a library that loads but
cannot launch. So before the sampler uses it, `usable_library(device)` test-launches one small
step on the sampler's device and compares it with the PyTorch step; if it cannot run, the sampler
falls back to the PyTorch step with one warning line. Every launch happens with the sampler's
device current (torch.cuda.device), so on a multi-GPU host the library's runtime uses that device's
context, not whichever the calling thread had.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from pathlib import Path
from typing import Sequence

import torch

from flowblend.errors import FlowblendError

from .buffers import SamplerBuffers
from .solvers import SolverTable
from .step import Combine, apply_combine

log = logging.getLogger("flowblend")

LIBRARY_NAME = "libflowblend_kernels.so"
ABI_VERSION = 1  # FLOWBLEND_ABI_VERSION in csrc/fused_step.h
MAX_SLOTS, MAX_OPS, MAX_TERMS = 8, 6, 6  # FLOWBLEND_MAX_* in csrc/fused_step.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
LATENTS_SLOT, VELOCITY_SLOT = "latents", "velocity"  # slots 0 and 1 of the C ABI


class CombineStruct(ctypes.Structure):
    """`flowblend_combine` of csrc/fused_step.h."""

    _fields_ = [("target", ctypes.c_int32), ("num_terms", ctypes.c_int32),
                ("source", ctypes.c_int32 * MAX_TERMS), ("coef", ctypes.c_float * MAX_TERMS)]


OpsArray = CombineStruct * MAX_OPS
SlotArray = ctypes.c_void_p * MAX_SLOTS
_COMMON_ARGS = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_float, SlotArray, ctypes.c_int32,
                OpsArray, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64]


def library_candidates() -> list[Path]:
    """Where a built library is looked for: the CMake build folder of a source checkout, then next to this module."""
    here = Path(__file__).resolve().parent
    return [here.parent / "build" / LIBRARY_NAME, here / LIBRARY_NAME]


@functools.lru_cache(maxsize=None)
def _open(path: str) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise FlowblendError(f"cannot load the fused-step library {path}: {exc}; rebuild it with `cmake -S . -B "
                             "build && cmake --build build`, or delete it to use the PyTorch path") from exc
    version = lib.flowblend_abi_version()
    if version != ABI_VERSION:
        raise FlowblendError(f"{path} has kernel ABI {version} but this flowblend needs {ABI_VERSION}: rebuild it "
                             "with `cmake --build build`")
    lib.flowblend_fused_step.argtypes = _COMMON_ARGS + [ctypes.c_void_p]
    lib.flowblend_fused_step.restype = ctypes.c_int
    lib.flowblend_fused_step_host.argtypes = list(_COMMON_ARGS)
    lib.flowblend_fused_step_host.restype = ctypes.c_int
    lib.flowblend_error_string.argtypes = [ctypes.c_int]
    lib.flowblend_error_string.restype = ctypes.c_char_p
    return lib


def load_library(path: str | Path | None = None) -> ctypes.CDLL | None:
    """The kernel library at `path`, else the first built one found, else None (use the PyTorch path)."""
    if path is not None:
        if not Path(path).is_file():
            raise FlowblendError(f"fused-step library {path} does not exist: build it with "
                                 "`cmake -S . -B build && cmake --build build`")
        return _open(str(Path(path).resolve()))
    for candidate in library_candidates():
        if candidate.is_file():
            return _open(str(candidate))
    return None


def slot_names(table: SolverTable) -> tuple[str, ...]:
    """The C ABI's slot order: latents, guided velocity, then the solver's state buffers."""
    return (LATENTS_SLOT, VELOCITY_SLOT) + tuple(table.state_names)


def pack_step(ops: tuple[Combine, ...], slots: dict[str, int]):
    """One step's Combines as the C struct array; the target's own term first, as `apply_combine` applies it."""
    if len(ops) > MAX_OPS:
        raise FlowblendError(f"a step has {len(ops)} solver ops; the fused kernel takes at most {MAX_OPS}")
    packed = OpsArray()
    for struct, op in zip(packed, ops):
        own = [t for t in op.terms if t[0] == op.target]
        terms = own[:1] + [t for t in op.terms if t[0] != op.target]
        if len(terms) > MAX_TERMS:
            raise FlowblendError(f"a solver op has {len(terms)} terms; the fused kernel takes at most {MAX_TERMS}")
        struct.target, struct.num_terms = slots[op.target], len(terms)
        for k, (name, coef) in enumerate(terms):
            struct.source[k], struct.coef[k] = slots[name], coef
    return packed, len(ops)


class FusedSteps:
    """The kernel's arguments for every step of one buffer set; `step(i)` runs step i's update.

    `guidance_scale` is one scale for every step or one per step (runtime/step.py's g[i]). `rows` is each
    step's batch (1: a model without CFG ran on the conditional row only; default: the buffers' batch); such
    a step reads row 0 of the velocity as the guided one and writes the next input into row 0.
    `host=True` runs the library's host build of the same per-element code on CPU tensors (tests).
    """

    def __init__(self, lib: ctypes.CDLL, buffers: SamplerBuffers, table: SolverTable,
                 guidance_scale: float | Sequence[float], host: bool = False, rows: Sequence[int] | None = None):
        velocity = buffers.velocity
        if velocity.dtype not in DTYPE_CODES:
            raise FlowblendError(f"the fused kernel takes fp32/fp16/bf16 velocity, not {velocity.dtype}")
        names = slot_names(table)
        if len(names) > MAX_SLOTS:
            raise FlowblendError(f"solver {table.name} needs {len(names)} buffers; the fused kernel takes {MAX_SLOTS}")
        tensors = {LATENTS_SLOT: buffers.latents, **buffers.state}
        for name, t in tensors.items():
            if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != buffers.latents.numel():
                raise FlowblendError(f"buffer {name!r} must be a contiguous float32 tensor shaped like the latents")
        self.buffers = buffers  # keeps every pointer below alive
        self.device = velocity.device
        self.host = host
        self._fn = lib.flowblend_fused_step_host if host else lib.flowblend_fused_step
        self._error_string = lib.flowblend_error_string
        slots = SlotArray(*[tensors[n].data_ptr() if n in tensors else None for n in names])
        index = {n: i for i, n in enumerate(names)}
        model_input = None if buffers.model_input is buffers.latents else buffers.model_input.data_ptr()
        scales = [guidance_scale] * table.num_steps if isinstance(guidance_scale, (int, float)) else guidance_scale
        if len(scales) != table.num_steps:
            raise FlowblendError(f"{len(scales)} guidance scales for {table.num_steps} steps: give one per step")
        rows = [velocity.shape[0]] * table.num_steps if rows is None else list(rows)
        if len(rows) != table.num_steps or any(r not in (1, velocity.shape[0]) for r in rows):
            raise FlowblendError(f"rows {rows} must give each of the {table.num_steps} steps batch 1 or "
                                 f"{velocity.shape[0]}")
        self._args = []
        for ops, scale, batch in zip(table.steps, scales, rows):
            packed, count = pack_step(ops, index)
            self._args.append((velocity.data_ptr(), batch, DTYPE_CODES[velocity.dtype], float(scale), slots,
                               len(names), packed, count, model_input, buffers.latents.numel()))

    def step(self, i: int) -> None:
        """Guide, apply step i's Combines and refresh the model input, in one launch on the current stream."""
        if self.host:
            rc = self._fn(*self._args[i])
        else:
            with torch.cuda.device(self.device):  # the library's runtime launches in this device's context
                rc = self._fn(*self._args[i], torch.cuda.current_stream(self.device).cuda_stream)
        if rc != 0:
            raise FlowblendError(f"fused step {i} failed: {self._error_string(rc).decode()} (code {rc}); "
                                 "fall back to the PyTorch path by removing build/" + LIBRARY_NAME)


_PROBE_TABLE = SolverTable(name="probe", timesteps=(999.0,), sigmas=(1.0, 0.0), state_names=(),
                           steps=((Combine("latents", (("latents", 1.0), ("velocity", -0.75))),),))


def probe_library(lib, device: torch.device) -> str | None:
    """One small step of the library on `device` against the PyTorch step: None if equal, else why it cannot run."""
    device = torch.device(device)
    scope = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with scope:
            bufs = SamplerBuffers.allocate((2, 1, 4, 4), (1, 4), _PROBE_TABLE.timesteps, True, torch.float32, device)
            g = torch.Generator().manual_seed(0)
            bufs.latents.copy_(torch.randn(tuple(bufs.latents.shape), generator=g))
            bufs.velocity.copy_(torch.randn(tuple(bufs.velocity.shape), generator=g))
            latents, velocity, scale = bufs.latents.clone(), bufs.velocity.clone(), 3.0
            guided = velocity[1:] + scale * (velocity[:1] - velocity[1:])
            apply_combine(_PROBE_TABLE.steps[0][0], {"latents": latents, "velocity": guided})
            FusedSteps(lib, bufs, _PROBE_TABLE, scale, host=device.type != "cuda").step(0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            error = (bufs.latents - latents).abs().max().item()
            error = max(error, (bufs.model_input - latents).abs().max().item())
    except Exception as exc:  # noqa: BLE001 - whatever stops the launch (driver too old, no device) means: fall back
        return f"{type(exc).__name__}: {exc}"
    if not error <= 1e-5:
        return f"its test step differs from the PyTorch step by {error:.3g}"
    return None


@functools.lru_cache(maxsize=None)
def _usable(device: str):
    try:
        lib = load_library()
    except FlowblendError as exc:  # a broken or stale build on the search path: the PyTorch step still works
        log.warning("flowblend: %s; using the PyTorch step", exc)
        return None
    if lib is None:
        return None
    problem = probe_library(lib, torch.device(device))
    if problem is not None:
        log.warning("flowblend: the fused-step kernel cannot run on %s (%s); using the PyTorch step", device, problem)
        return None
    return lib


def usable_library(device: torch.device) -> ctypes.CDLL | None:
    """The built kernel library if it runs on `device` (test-launched once per device), else None."""
    return _usable(str(torch.device(device)))


def fused_steps_for(buffers: SamplerBuffers, table: SolverTable, guidance_scale: float | Sequence[float],
                    rows: Sequence[int] | None = None) -> FusedSteps | None:
    """FusedSteps for CUDA buffers when the library is built and runs there; None means: use the PyTorch ops."""
    if not buffers.latents.is_cuda:
        return None
    lib = usable_library(buffers.latents.device)
    return None if lib is None else FusedSteps(lib, buffers, table, guidance_scale, rows=rows)
