"""runtime/graph.py on CPU: the capture state machine and cache, driven through a stand-in graph backend.

`FakeGraphBackend` records the calls GraphRunner makes; a fake "graph" replays by re-running the
steps that were captured, so results can be compared with the plain eager sampler (the reference).
Also checked here, because it decides whether a real capture can succeed: the loop of the real
diffusers transformers never syncs with the host. The real torch.cuda.CUDAGraph path runs in
tests/test_gpu.py.
"""
import sys

import pytest
import torch
from tiny_models import TEXT, WAN_LATENT, latent_shape, tiny_pair
from torch.utils._python_dispatch import TorchDispatchMode

from flowblend.engines.torch_engine import TorchEngine
from flowblend.errors import FlowblendError
from flowblend.runtime.graph import GraphRunner, GraphState, TorchGraphBackend
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions

STEPS = 6


class FakeGraph:
    def __init__(self, body):
        self.body = body


class FakeGraphBackend:
    """Records warm_up/begin/end/replay; a graph replays what was run while it was being captured."""

    def __init__(self, fail_end=False):
        self.events, self.capturing, self.fail_end = [], False, fail_end

    def warm_up(self, fn):
        self.events.append("warm_up")
        fn()

    def begin_capture(self, body):
        assert not self.capturing, "captures must not nest"
        self.events.append("begin")
        self.capturing = True
        return FakeGraph(body)

    def end_capture(self, graph):
        self.events.append("end")
        self.capturing = False
        if self.fail_end:
            raise RuntimeError("operation not permitted when stream is capturing (capture invalidated)")

    def is_capturing(self):
        return self.capturing

    def discard_stream(self):
        assert not self.capturing, "a stream is discarded only after its capture ended"
        self.events.append("discard_stream")

    def replay(self, graph):
        self.events.append("replay")
        graph.body()


@pytest.fixture(scope="module")
def wan_engines():
    return {n: TorchEngine(m) for n, m in tiny_pair("wan").items()}


def request(seed, shape=WAN_LATENT):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn((1, *s), generator=g) for s in (shape, TEXT, TEXT))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode", ["whole", "per_step"])
def test_replays_equal_the_eager_loop_and_capture_happens_once(wan_engines, mode):
    plan = BlendPlan.parse("LSL:0.4,0.2", STEPS)
    reference = Sampler(wan_engines, plan, SamplerOptions(guidance_scale=4.0))
    backend = FakeGraphBackend()
    runner = GraphRunner(Sampler(wan_engines, plan, SamplerOptions(guidance_scale=4.0)), mode=mode, backend=backend)
    first = runner.sample(*request(1))
    graphs = 1 if mode == "whole" else STEPS
    assert backend.events == ["warm_up"] + ["begin", "end"] * graphs + ["replay"] * graphs
    assert runner.state is GraphState.READY
    assert rel(first, reference.sample(*request(1))) <= 1e-6
    # a second request with new noise and text: only a replay, and it equals a fresh eager run
    second = runner.sample(*request(2))
    assert backend.events[-graphs:] == ["replay"] * graphs and backend.events.count("begin") == graphs
    assert rel(second, reference.sample(*request(2))) <= 1e-6
    assert rel(second, first) > 1e-3  # the request really changed


def test_a_new_shape_gets_its_own_graph_and_buffers(wan_engines):
    plan = BlendPlan.parse("LSL:0.4,0.2", STEPS)
    reference = Sampler(wan_engines, plan, SamplerOptions(guidance_scale=4.0))
    backend = FakeGraphBackend()
    runner = GraphRunner(Sampler(wan_engines, plan, SamplerOptions(guidance_scale=4.0)), backend=backend)
    other = (4, 2, 4, 4)
    a = runner.sample(*request(1))
    buffers_a = runner.current.sampler.buffers
    b = runner.sample(*request(3, other))
    assert backend.events.count("begin") == 2 and len(runner.cache) == 2
    assert runner.current.sampler.buffers.latents.data_ptr() != buffers_a.latents.data_ptr()
    a_again = runner.sample(*request(4))  # back to the first shape: replay only, into its own buffers
    assert backend.events.count("begin") == 2 and runner.current.sampler.buffers is buffers_a
    assert rel(a, reference.sample(*request(1))) <= 1e-6
    assert rel(b, reference.sample(*request(3, other))) <= 1e-6
    assert rel(a_again, reference.sample(*request(4))) <= 1e-6


class FailingEngine:
    """Wraps an engine; raises at `fail_step` while the backend is capturing (as a host sync would)."""

    def __init__(self, engine, backend, fail_step, error=RuntimeError):
        self.engine, self.backend, self.fail_step, self.error = engine, backend, fail_step, error
        self.input_names, self.output_names = engine.input_names, engine.output_names
        self.device, self.dtype = engine.device, engine.dtype

    def bind(self, tensors):
        self.engine.bind(tensors)

    def run(self, step):
        if self.backend.capturing and step == self.fail_step:
            raise self.error("cudaErrorStreamCaptureUnsupported: operation not permitted when stream is capturing")
        self.engine.run(step)


def test_exception_mid_capture_ends_the_capture_and_fails_clearly(wan_engines):
    backend = FakeGraphBackend()
    engines = {"large": wan_engines["large"], "small": FailingEngine(wan_engines["small"], backend, fail_step=3)}
    runner = GraphRunner(Sampler(engines, BlendPlan.parse("LSL:0.4,0.2", STEPS), SamplerOptions(guidance_scale=4.0)), backend=backend)
    with pytest.raises(FlowblendError, match=r"capture failed at step 3 \(small\).*StreamCaptureUnsupported.*eager"):
        runner.sample(*request(1))
    assert backend.events == ["warm_up", "begin", "end", "discard_stream"] and not backend.capturing
    assert runner.state is GraphState.FAILED
    with pytest.raises(FlowblendError, match="failed earlier"):
        runner.sample(*request(2))
    assert backend.events.count("begin") == 1  # not retried behind the user's back
    with pytest.raises(FlowblendError, match="replay\\(\\) before a graph was captured \\(state failed\\)"):
        runner.replay()


def test_interrupt_mid_capture_still_ends_the_capture(wan_engines):
    backend = FakeGraphBackend()
    engines = {"large": FailingEngine(wan_engines["large"], backend, 0, KeyboardInterrupt),
               "small": wan_engines["small"]}
    runner = GraphRunner(Sampler(engines, BlendPlan.parse("LLL", 3), SamplerOptions(guidance_scale=4.0)), backend=backend)
    with pytest.raises(KeyboardInterrupt):
        runner.sample(*request(1))
    assert backend.events[-2:] == ["end", "discard_stream"] and not backend.capturing
    assert runner.state is GraphState.FAILED


def test_invalidated_capture_and_failed_warm_up_are_clear_errors(wan_engines):
    backend = FakeGraphBackend(fail_end=True)
    runner = GraphRunner(Sampler(wan_engines, BlendPlan.parse("LLL", 3), SamplerOptions(guidance_scale=4.0)), backend=backend)
    with pytest.raises(FlowblendError, match="capture failed at step 2 .*capture invalidated"):
        runner.sample(*request(1))
    assert runner.state is GraphState.FAILED

    class BrokenWarmUp(FakeGraphBackend):
        def warm_up(self, fn):
            raise RuntimeError("CUBLAS_STATUS_NOT_INITIALIZED")

    runner = GraphRunner(Sampler(wan_engines, BlendPlan.parse("LLL", 3), SamplerOptions(guidance_scale=4.0)), backend=BrokenWarmUp())
    with pytest.raises(FlowblendError, match="warm-up failed: RuntimeError: CUBLAS"):
        runner.sample(*request(1))
    assert runner.state is GraphState.FAILED


def test_replay_before_capture_and_bad_modes_are_refused(wan_engines):
    sampler = Sampler(wan_engines, BlendPlan.parse("LLL", 2), SamplerOptions(guidance_scale=4.0))
    runner = GraphRunner(sampler, backend=FakeGraphBackend())
    with pytest.raises(FlowblendError, match="replay\\(\\) before a graph was captured \\(nothing loaded\\)"):
        runner.replay()
    with pytest.raises(ValueError, match="unknown graph mode 'loop'.*whole, per_step, eager"):
        GraphRunner(sampler, mode="loop")
    with pytest.raises(FlowblendError, match="CUDA graphs need a CUDA device.*mode='eager'"):
        GraphRunner(sampler)  # the real backend, on a CPU sampler
    with pytest.raises(FlowblendError, match="CUDA graphs need a CUDA device"):
        TorchGraphBackend("cpu")


def test_eager_mode_is_the_plain_sampler(wan_engines):
    plan = BlendPlan.parse("LSL:0.4,0.2", STEPS)
    runner = GraphRunner(Sampler(wan_engines, plan, SamplerOptions(guidance_scale=4.0)), mode="eager")
    out = runner.sample(*request(5))
    assert rel(out, Sampler(wan_engines, plan, SamplerOptions(guidance_scale=4.0)).sample(*request(5))) == 0.0


def test_cache_key_names_everything_that_changes_the_graph(wan_engines):
    plan = BlendPlan.parse("LSL:0.4,0.2", STEPS)
    keys = {GraphRunner(Sampler(wan_engines, p, SamplerOptions(solver=s, guidance_scale=g)), backend=FakeGraphBackend())
            .key(WAN_LATENT, TEXT)
            for p, s, g in [(plan, "unipc", 4.0), (plan, "euler", 4.0), (plan, "unipc", 5.0),
                            (BlendPlan.parse("LLL", STEPS), "unipc", 4.0),
                            (BlendPlan.parse("LSL:0.4,0.2", 8), "unipc", 4.0)]}
    assert len(keys) == 5


SYNC_OPS = ("_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "unique", "masked_select")


class SyncRecorder(TorchDispatchMode):
    """aten ops that need the value of a device tensor on the host: each one breaks a CUDA graph capture."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in SYNC_OPS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def test_recorder_sees_a_host_sync():
    rec = SyncRecorder()
    with rec:
        torch.ones(3).sum().item()
    assert rec.syncs


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_the_loop_of_the_real_transformers_never_syncs_with_the_host(family):
    engines = {n: TorchEngine(m) for n, m in tiny_pair(family).items()}
    sampler = Sampler(engines, BlendPlan.parse("LSL:0.4,0.2", STEPS), SamplerOptions(guidance_scale=4.0))
    noise, text, neg = request(1, latent_shape(family))
    mask = torch.ones(1, TEXT[0], dtype=torch.int64) if family == "ltx" else None
    sampler.load_request(noise, text, neg, prompt_mask=mask, negative_prompt_mask=mask)
    rec = SyncRecorder()
    with torch.no_grad(), rec:
        sampler.run_loop()
    assert rec.syncs == [], f"{family}: host syncs inside the loop would break capture: {sorted(set(rec.syncs))}"


def test_tensorrt_engines_are_captured_with_every_steps_timestep_row(monkeypatch):
    import fake_tensorrt
    from test_trt_engine import LATENT, make_pair
    from test_trt_engine import TEXT as TRT_TEXT

    from flowblend.engines.trt_engine import share_activation_memory

    fake_tensorrt.reset()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    engines = make_pair()
    share_activation_memory(engines)
    plan = BlendPlan.parse("LSL:0.4,0.2", STEPS)
    runner = GraphRunner(Sampler(engines, plan, SamplerOptions(guidance_scale=4.0)), backend=FakeGraphBackend())
    text = torch.randn(1, *TRT_TEXT)
    runner.sample(torch.randn(1, *LATENT), text, text)
    runs = fake_tensorrt.events("execute_async_v3")
    assert len(runs) == 3 * STEPS  # warm-up, capture, replay
    table = runner.current.sampler.buffers.timestep_table
    captured = runs[STEPS:2 * STEPS]
    contexts = {id(e.context): n for n, e in engines.items()}
    assert [contexts[r[3]] for r in captured] == list(plan.models)
    assert [r[2]["timestep"] for r in captured] == [table[i].data_ptr() for i in range(STEPS)]


def test_cli_generate_graph_needs_cuda(tmp_path, capsys):
    from flowblend.cli.main import main

    out = tmp_path / "v.mp4"
    assert main(["generate", "--prompt", "a red circle moving left", "--graph", "whole", "--steps", "2",
                 "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--graph whole captures CUDA graphs: pass --device cuda" in err
    assert not out.exists()
