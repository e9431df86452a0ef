"""runtime/fused.py's load-time check, on CPU: a kernel library that cannot run (driver older than the
toolkit that built it, wrong device, wrong numbers) is test-launched once and left out with one
warning line, and the sampler keeps the PyTorch step. The real library's device launch is checked
in tests/test_gpu.py; its host build against the PyTorch step in tests/test_kernels_build.py."""
import logging
from types import SimpleNamespace

import torch

from flowblend.runtime import fused


class StubLibrary:
    """The C ABI of the library with launches that return `rc` and compute nothing."""

    def __init__(self, rc=0):
        self.rc = rc

    def flowblend_fused_step(self, *args):
        return self.rc

    def flowblend_fused_step_host(self, *args):
        return self.rc

    def flowblend_error_string(self, rc):
        return b"CUDA driver version is insufficient for CUDA runtime version"


def test_probe_compares_a_test_step_with_the_pytorch_step():
    assert "differs from the PyTorch step" in fused.probe_library(StubLibrary(0), torch.device("cpu"))
    assert "insufficient" in fused.probe_library(StubLibrary(35), torch.device("cpu"))


def test_a_library_that_cannot_launch_falls_back_with_one_warning(monkeypatch, caplog):
    fused._usable.cache_clear()
    monkeypatch.setattr(fused, "load_library", lambda path=None: StubLibrary(35))
    buffers = SimpleNamespace(latents=SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))
    with caplog.at_level(logging.WARNING, logger="flowblend"):
        assert fused.fused_steps_for(buffers, None, 5.0) is None
        assert fused.fused_steps_for(buffers, None, 5.0) is None  # tested once per device, warned once
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "cannot run on cuda:1" in lines[0] and "using the PyTorch step" in lines[0]
    fused._usable.cache_clear()


def test_a_stale_library_on_the_search_path_falls_back_too(monkeypatch, caplog):
    fused._usable.cache_clear()

    def stale(path=None):
        raise fused.FlowblendError("libflowblend_kernels.so has kernel ABI 0 but this flowblend needs 1")

    monkeypatch.setattr(fused, "load_library", stale)
    with caplog.at_level(logging.WARNING, logger="flowblend"):
        assert fused.usable_library(torch.device("cuda", 0)) is None
    assert len(caplog.records) == 1 and "ABI 0" in caplog.records[0].getMessage()
    fused._usable.cache_clear()
