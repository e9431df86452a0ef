"""The fused-step library: CMake + nvcc compile (sm_80, sm_90), its exported C ABI, and its arithmetic.

nvcc compiles without a GPU, and the library carries a host build of the kernel's own per-element
function (`flowblend_fused_step_host`), so the math and the argument checks are tested here on CPU
against the PyTorch step (runtime/sampler.py), which is the reference. The device kernel itself is
checked against the same reference in tests/test_gpu.py.
"""
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from flowblend.errors import FlowblendError
from flowblend.runtime import fused
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions

ROOT = Path(__file__).resolve().parents[1]
API = {"flowblend_fused_step", "flowblend_fused_step_host", "flowblend_error_string", "flowblend_abi_version"}

pytestmark = pytest.mark.skipif(not (shutil.which("nvcc") and shutil.which("cmake")),
                                reason="nvcc and cmake are needed to compile csrc/ (CUDA toolkit not installed)")


def _build(build: Path, *flags: str) -> Path:
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", *flags],
                ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return build


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("kernels"))


def _exported_text_symbols(lib: Path) -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.split()[1:2] == ["T"]}


def test_library_exports_exactly_the_c_abi(built):
    lib = built / fused.LIBRARY_NAME
    assert lib.is_file()
    assert _exported_text_symbols(lib) == API  # hidden visibility: nothing else (no C++ or static-cudart symbols) leaks


def test_a_statically_linked_cxx_runtime_stays_out_of_the_exported_set(tmp_path):
    """The H200 machine's toolchain (2026-12-04) linked a C++ runtime in statically and the library
    exported 83 text symbols (79 of libstdc++); -static-libstdc++ reproduces that here (83 without
    CMakeLists.txt's --exclude-libs,ALL), and the library must still export only its C ABI."""
    lib = _build(tmp_path / "static-cxx", "-DCMAKE_SHARED_LINKER_FLAGS=-static-libstdc++") / fused.LIBRARY_NAME
    assert _exported_text_symbols(lib) == API


def test_compiled_for_ampere_and_hopper(built):
    flags = (built / "CMakeFiles" / "flowblend_kernels.dir" / "flags.make").read_text()
    for arch in ("80", "90"):
        assert f"code=[compute_{arch},sm_{arch}]" in flags


def test_abi_version_matches_the_loader(built):
    lib = fused.load_library(built / fused.LIBRARY_NAME)
    assert lib.flowblend_abi_version() == fused.ABI_VERSION
    header = (ROOT / "csrc" / "fused_step.h").read_text()
    for name, value in (("ABI_VERSION", fused.ABI_VERSION), ("MAX_SLOTS", fused.MAX_SLOTS),
                        ("MAX_OPS", fused.MAX_OPS), ("MAX_TERMS", fused.MAX_TERMS)):
        assert f"#define FLOWBLEND_{name} {value}" in header
    assert ctypes.sizeof(fused.CombineStruct) == 8 + 8 * fused.MAX_TERMS


def test_the_load_time_probe_passes_on_the_host_build(built):
    """The test step runtime/fused.py launches at load equals the PyTorch step (host build here, device in test_gpu)."""
    assert fused.probe_library(fused.load_library(built / fused.LIBRARY_NAME), torch.device("cpu")) is None


class ScaleEngine:
    """Velocity = per-row scale * model input: the rows differ, so CFG really combines two predictions.

    Both rows have the same sign and lie within a factor 2 of each other, so cond - uncond is exact in
    any float format (Sterbenz): the PyTorch path subtracts in the engine dtype, the kernel in fp32,
    and with an exact difference the comparison is not blurred by that (deliberate) difference.
    """

    input_names = ("latents", "timestep", "text_embeds")
    output_names = ("velocity",)

    def __init__(self, device="cpu", dtype=torch.float32):
        self.device, self.dtype = torch.device(device), dtype

    def bind(self, tensors):
        self.inp, self.out = tensors["latents"], tensors["velocity"]
        self.scale = torch.tensor([0.6, 0.45][: self.out.shape[0]], dtype=torch.float32).view(-1, 1, 1, 1, 1)

    def run(self, step):
        self.out.copy_(self.inp.float() * (self.scale + 0.01 * step))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("guidance", [1.0, 4.5])
@pytest.mark.parametrize("solver", ["unipc", "euler", "dpm++", "dpm++3m"])
def test_host_build_of_the_kernel_equals_the_pytorch_step(built, solver, guidance, dtype):
    lib = fused.load_library(built / fused.LIBRARY_NAME)
    plan = BlendPlan.parse("LSL:0.4,0.2", 7)
    noise = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    text = torch.randn(1, 5, 8)

    def run(use_kernel: bool):
        engines = {"large": ScaleEngine(dtype=dtype), "small": ScaleEngine(dtype=dtype)}
        sampler = Sampler(engines, plan, SamplerOptions(solver=solver, guidance_scale=guidance))
        bufs = sampler.load_request(noise, text, text if guidance > 1 else None)
        kernel = fused.FusedSteps(lib, bufs, sampler.table, guidance, host=True) if use_kernel else None
        for i, name in enumerate(plan.models):
            if kernel is None:
                sampler.step(i)  # the PyTorch ops: reference
            else:
                engines[name].run(i)
                kernel.step(i)
        return bufs.latents.clone(), bufs.model_input.clone(), {k: v.clone() for k, v in bufs.state.items()}

    (ref, ref_in, ref_state), (got, got_in, got_state) = run(False), run(True)
    tol = 1e-6 if dtype == torch.float32 else 1e-5  # fp32 math in both; only rounding order differs
    assert ((got - ref).norm() / ref.norm()).item() <= tol
    for name in ref_state:
        assert ((got_state[name] - ref_state[name]).norm() / ref_state[name].norm().clamp_min(1e-12)).item() <= tol
    # next model input: the latents cast to the engine dtype, in every CFG row
    assert got_in.dtype == dtype and got_in.shape == ref_in.shape
    assert torch.allclose(got_in.float(), ref_in.float(), rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-6)


def test_bad_arguments_are_refused_with_a_message(built):
    lib = fused.load_library(built / fused.LIBRARY_NAME)
    velocity = torch.zeros(2, 8)
    latents = torch.zeros(8)
    slots = fused.SlotArray(latents.data_ptr(), None)
    ops, count = fused.pack_step((fused.Combine("latents", (("latents", 1.0), ("velocity", -0.1))),),
                                 {"latents": 0, "velocity": 1})
    call = lib.flowblend_fused_step_host
    assert call(velocity.data_ptr(), 2, 0, 5.0, slots, 2, ops, count, None, 8) == 0
    assert call(velocity.data_ptr(), 3, 0, 5.0, slots, 2, ops, count, None, 8) == -2
    assert call(velocity.data_ptr(), 2, 7, 5.0, slots, 2, ops, count, None, 8) == -1
    missing = fused.SlotArray(None, None)
    assert call(velocity.data_ptr(), 2, 0, 5.0, missing, 2, ops, count, None, 8) == -5
    bad, _ = fused.pack_step((fused.Combine("latents", (("x0_5", 1.0),)),), {"latents": 0, "velocity": 1, "x0_5": 6})
    assert call(velocity.data_ptr(), 2, 0, 5.0, slots, 2, bad, 1, None, 8) == -4
    assert b"batch" in lib.flowblend_error_string(-2)
    assert b"NULL" in lib.flowblend_error_string(-5)


def test_explicit_missing_library_is_a_clear_error(tmp_path):
    with pytest.raises(FlowblendError, match="cmake -S . -B build"):
        fused.load_library(tmp_path / "nope.so")


def test_cpu_buffers_never_take_the_kernel_path():
    sampler = Sampler({"large": ScaleEngine(), "small": ScaleEngine()}, BlendPlan.parse("LLL", 3),
                      SamplerOptions(guidance_scale=3.0))
    bufs = sampler.prepare((4, 3, 4, 6), (5, 8))
    assert fused.fused_steps_for(bufs, sampler.table, 3.0) is None


@pytest.mark.parametrize("solver", ["unipc", "dpm++3m"])
def test_host_build_runs_a_plan_whose_middle_model_skips_cfg(built, solver):
    """A stage at guidance 1 runs batch 1: the kernel reads row 0 as the guided velocity, and the sampler copies
    the next input into the unconditional row before a guided step follows."""
    lib = fused.load_library(built / fused.LIBRARY_NAME)
    plan = BlendPlan.parse("L2,S3/5,L2", 9)
    scales = (4.5, 4.5, 1.0, 1.0, 1.0, 4.5, 4.5)
    noise = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(5))
    text = torch.randn(1, 5, 8)

    def run(use_kernel: bool):
        engines = {"large": ScaleEngine(), "small": ScaleEngine()}
        sampler = Sampler(engines, plan, SamplerOptions(solver=solver, guidance_table=scales, fused_kernel=False))
        bufs = sampler.load_request(noise, text, text)
        assert sampler.rows == {"large": 2, "small": 1}
        if use_kernel:
            sampler._fused = fused.FusedSteps(lib, bufs, sampler.table, scales, host=True, rows=sampler._step_rows)
        sampler.run_loop()
        return bufs.latents.clone()

    ref, got = run(False), run(True)
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-6
