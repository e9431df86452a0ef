"""runtime/graph.py on CPU: the capture state machine and cache, driven through a stand-in graph backend.

`FakeGraphBackend` (tests/fake_cuda_graph.py) records the calls GraphRunner makes; its graphs
replay only the aten ops and TensorRT enqueues recorded while capturing, never the Python step, so a
value frozen at capture time gives a wrong result there as on a GPU. Results are compared with the
plain eager sampler (the reference).
Also checked here, because it decides whether a real capture can succeed: the loop of the real
diffusers transformers never syncs with the host. The real torch.cuda.CUDAGraph path runs in
tests/test_gpu.py.
"""
import sys

import pytest
import torch
from fake_cuda_graph import FakeGraphBackend, watch_host_syncs
from tiny_models import TEXT, WAN_LATENT, latent_shape, tiny_pair

from flowblend.engines.torch_engine import TorchEngine
from flowblend.errors import FlowblendError
from flowblend.runtime.graph import GraphRunner, GraphState, TorchGraphBackend
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions

STEPS = 6


@pytest.fixture(scope="module")
def wan_engines():
    return {n: TorchEngine(m) for n, m in tiny_pair("wan").items()}


def request(seed, shape=WAN_LATENT):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn((1, *s), generator=g) for s in (shape, TEXT, TEXT))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "dpm++3m"])
@pytest.mark.parametrize("mode", ["whole", "per_step"])
def test_replays_equal_the_eager_loop_and_capture_happens_once(wan_engines, mode, solver):
    plan = BlendPlan.parse("LSL:0.4,0.2", STEPS)
    options = SamplerOptions(solver=solver, guidance_scale=4.0)
    reference = Sampler(wan_engines, plan, options)
    backend = FakeGraphBackend()
    runner = GraphRunner(Sampler(wan_engines, plan, options), mode=mode, backend=backend)
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


@pytest.mark.parametrize("mode", ["whole", "per_step", "eager"])
def test_on_step_runs_between_graph_launches_only(wan_engines, mode):
    """A per-step callback (the server's progress and cancellation) sees each step where Python regains
    control: after every per-step graph, once after a whole-loop graph; a raise stops the remaining steps."""
    plan = BlendPlan.parse("LSL:0.4,0.2", STEPS)
    backend = FakeGraphBackend() if mode != "eager" else None
    runner = GraphRunner(Sampler(wan_engines, plan, SamplerOptions(guidance_scale=4.0)), mode=mode, backend=backend)
    seen = []

    def on_step(i):
        seen.append((i, backend.events.count("replay") if backend else None))

    plain = runner.sample(*request(1))
    with_hook = runner.sample(*request(1), on_step=on_step)
    assert torch.equal(plain, with_hook)
    if mode == "whole":
        assert seen == [(STEPS - 1, 2)]
    elif mode == "per_step":
        assert seen == [(i, STEPS + i + 1) for i in range(STEPS)]
    else:
        assert [i for i, _ in seen] == list(range(STEPS))

    class Stop(Exception):
        pass

    def stop_after_1(i):
        if i == 1:
            raise Stop

    if mode != "whole":
        before = backend.events.count("replay") if backend else 0
        with pytest.raises(Stop):
            runner.sample(*request(2), on_step=stop_after_1)
        if backend:
            assert backend.events.count("replay") - before == 2


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


def test_the_eager_loop_runs_on_a_dedicated_stream(wan_engines):
    """Never the legacy default stream (handle 0), where TensorRT syncs the device around every enqueue."""
    from flowblend.engines.streams import DEFAULT_STREAM, current_stream_handle

    seen = []

    class Spy:
        def __init__(self, engine):
            self.engine, self.input_names, self.output_names = engine, engine.input_names, engine.output_names
            self.device, self.dtype = engine.device, engine.dtype

        def bind(self, tensors):
            self.engine.bind(tensors)

        def run(self, step):
            seen.append(current_stream_handle(torch.device("cpu")))
            self.engine.run(step)

    sampler = Sampler({n: Spy(e) for n, e in wan_engines.items()}, BlendPlan.parse("LSL:0.4,0.2", 4), SamplerOptions(guidance_scale=4.0))
    sampler.sample(*request(1))
    assert len(seen) == 4 and DEFAULT_STREAM not in seen and len(set(seen)) == 1


def test_exception_mid_capture_ends_the_capture_and_fails_clearly(wan_engines):
    backend = FakeGraphBackend()
    engines = {"large": wan_engines["large"], "small": FailingEngine(wan_engines["small"], backend, fail_step=3)}
    runner = GraphRunner(Sampler(engines, BlendPlan.parse("LSL:0.4,0.2", STEPS),
                                 SamplerOptions(guidance_scale=4.0)), backend=backend)
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
    runner = GraphRunner(Sampler(engines, BlendPlan.parse("LLL", 3),
                                 SamplerOptions(guidance_scale=4.0)), backend=backend)
    with pytest.raises(KeyboardInterrupt):
        runner.sample(*request(1))
    assert backend.events[-2:] == ["end", "discard_stream"] and not backend.capturing
    assert runner.state is GraphState.FAILED


def test_invalidated_capture_and_failed_warm_up_are_clear_errors(wan_engines):
    backend = FakeGraphBackend(fail_end=True)
    runner = GraphRunner(Sampler(wan_engines, BlendPlan.parse("LLL", 3),
                                 SamplerOptions(guidance_scale=4.0)), backend=backend)
    with pytest.raises(FlowblendError, match="capture failed at step 2 .*capture invalidated"):
        runner.sample(*request(1))
    assert runner.state is GraphState.FAILED

    class BrokenWarmUp(FakeGraphBackend):
        def warm_up(self, fn):
            raise RuntimeError("CUBLAS_STATUS_NOT_INITIALIZED")

    runner = GraphRunner(Sampler(wan_engines, BlendPlan.parse("LLL", 3),
                                 SamplerOptions(guidance_scale=4.0)), backend=BrokenWarmUp())
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


def _in_capture(body):
    backend = FakeGraphBackend()
    graph = backend.begin_capture()
    try:
        return body(), graph
    finally:
        backend.end_capture(graph)


HOST_SYNCS = {
    "item": lambda x, m: x.sum().item(), "tolist": lambda x, m: x.tolist(), "numpy": lambda x, m: x.numpy(),
    "cpu": lambda x, m: x.cpu(), "to('cpu')": lambda x, m: x.to("cpu"),
    "to(device='cpu')": lambda x, m: x.to(device="cpu", dtype=torch.float16),
    "boolean mask": lambda x, m: x[m], "boolean mask write": lambda x, m: x.__setitem__(m, 0.0),
    "repeat_interleave(tensor)": lambda x, m: x.repeat_interleave(m.long()),
    "allclose": lambda x, m: torch.allclose(x, x), "equal": lambda x, m: torch.equal(x, x),
    "str": lambda x, m: str(x), "f-string": lambda x, m: f"{x}", "if tensor": lambda x, m: bool(x.sum() > 0),
    "nonzero": lambda x, m: m.nonzero(), "unique": lambda x, m: x.unique(),
}


@pytest.mark.parametrize("what", sorted(HOST_SYNCS))
def test_a_host_sync_inside_a_fake_capture_is_refused(what):
    """Control: each of these breaks a real capture (it reads device data on the host or gives a shape only
    the data knows); the stand-in refused only the scalar reads, by op name, before issue 35."""
    x, mask = torch.arange(4.0), torch.tensor([True, False, True, True])
    with pytest.raises(RuntimeError, match="cudaErrorStreamCaptureUnsupported"):
        _in_capture(lambda: HOST_SYNCS[what](x, mask))


def test_what_a_capture_may_do_is_not_refused():
    x = torch.arange(4.0)
    _, graph = _in_capture(lambda: (x.to(x.device), x.repeat_interleave(2), x.masked_fill(x > 1, 0.0),
                                    x.repeat_interleave(torch.tensor([1, 0, 2, 1]), output_size=4)))
    assert graph.ops


def test_capture_records_only_the_capturing_stream():
    """Work issued to another stream is not in the graph (it ran once, a replay does not repeat it); work on the
    legacy default stream while capturing fails, as in the default "global" capture mode."""
    from flowblend.engines.streams import DEFAULT_STREAM, HostStream, new_stream, use_stream

    x, y = torch.zeros(2), torch.zeros(2)

    def body():
        x.add_(1.0)
        with use_stream(new_stream("cpu"), "cpu"):
            y.add_(1.0)
    _, graph = _in_capture(body)
    graph.replay()
    assert x.tolist() == [2.0, 2.0] and y.tolist() == [1.0, 1.0]
    with pytest.raises(RuntimeError, match="cudaErrorStreamCaptureImplicit"):
        def on_default():
            with use_stream(HostStream(DEFAULT_STREAM), "cpu"):
                x.add_(1.0)
        _in_capture(on_default)


def test_the_sync_watch_sees_a_host_sync():
    with watch_host_syncs() as seen:
        torch.ones(3).sum().item()
        torch.ones(3).tolist()
        torch.ones(3)[torch.tensor([True, False, True])]
    assert len(seen) >= 3


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_the_loop_of_the_real_transformers_never_syncs_with_the_host(family):
    engines = {n: TorchEngine(m) for n, m in tiny_pair(family).items()}
    sampler = Sampler(engines, BlendPlan.parse("LSL:0.4,0.2", STEPS), SamplerOptions(guidance_scale=4.0))
    noise, text, neg = request(1, latent_shape(family))
    mask = torch.ones(1, TEXT[0], dtype=torch.int64) if family == "ltx" else None
    sampler.load_request(noise, text, neg, prompt_mask=mask, negative_prompt_mask=mask)
    with torch.no_grad(), watch_host_syncs() as syncs:
        sampler.run_loop()
    assert syncs == [], f"{family}: host syncs inside the loop would break capture: {sorted(set(syncs))}"


def test_frozen_python_values_are_frozen_in_the_stand_in_graph(wan_engines):
    """The graph stand-in replays recorded ops, not Python: a step that reads a Python value gets the captured one."""
    backend = FakeGraphBackend()
    x = torch.zeros(3)
    scale = {"value": 1.0}
    graph = backend.begin_capture()
    x.add_(scale["value"])  # the Python float 1.0 is an argument of the recorded op
    backend.end_capture(graph)
    scale["value"] = 5.0
    backend.replay(graph)
    assert x.tolist() == [2.0, 2.0, 2.0]  # 1 at capture + 1 at replay: 5.0 never reaches the graph
    y = torch.zeros(2)
    graph = backend.begin_capture()
    z = y + 1.0  # a fresh tensor at capture: replay writes into that same tensor
    backend.end_capture(graph)
    y.fill_(10.0)
    backend.replay(graph)
    assert z.tolist() == [11.0, 11.0]
    graph = backend.begin_capture()
    with pytest.raises(RuntimeError, match="StreamCaptureUnsupported"):
        torch.ones(1).item()
    backend.end_capture(graph)


def _trt_pair(monkeypatch):
    import fake_tensorrt
    from test_trt_engine import make_pair

    from flowblend.engines.trt_engine import share_activation_memory

    fake_tensorrt.reset()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    engines = make_pair()
    share_activation_memory(engines)
    return fake_tensorrt, engines


def _trt_reference(plan, noise, text, guidance=4.0):
    """The eager blended loop over the stand-in's velocity function (fp16 I/O like the engines), no TensorRT."""
    import fake_tensorrt

    class Reference:
        input_names, output_names = ("latents", "timestep", "text_embeds"), ("velocity",)
        device, dtype = torch.device("cpu"), torch.float16

        def bind(self, t):
            self.t = t

        def run(self, step):
            t = self.t
            t["velocity"].copy_(fake_tensorrt.reference_velocity(t["latents"], t["timestep"][step], t["text_embeds"]))

    ref = {"large": Reference(), "small": Reference()}
    return Sampler(ref, plan, SamplerOptions(guidance_scale=guidance), dtype=torch.float16).sample(noise, text, text)


@pytest.mark.parametrize("mode", ["whole", "per_step"])
def test_tensorrt_loop_replays_equal_eager_with_addresses_bound_once(monkeypatch, mode):
    from test_trt_engine import LATENT
    from test_trt_engine import TEXT as TRT_TEXT

    trt, engines = _trt_pair(monkeypatch)
    plan = BlendPlan.parse("LSL:0.4,0.2", STEPS)
    runner = GraphRunner(Sampler(engines, plan, SamplerOptions(guidance_scale=4.0)), mode=mode, backend=FakeGraphBackend())
    g = torch.Generator().manual_seed(3)
    noise, text = torch.randn(1, *LATENT, generator=g), torch.randn(1, *TRT_TEXT, generator=g)
    out = runner.sample(noise, text, text)
    reference = _trt_reference(plan, noise, text)
    assert rel(out, reference) <= 1e-3  # fp16 engine I/O in both
    # every context got its four addresses once, all 256-byte aligned; none changed per step
    addresses = trt.events("set_tensor_address")
    assert len(addresses) == 4 * len(engines) and all(ptr % 256 == 0 for _, _, ptr, _ in addresses)
    # a second request replays only (no new contexts, no new addresses) and still equals eager
    noise2 = torch.randn(1, *LATENT, generator=g)
    before = len(trt.EVENTS)
    out2 = runner.sample(noise2, text, text)
    assert not [e for e in trt.EVENTS[before:] if e[0] in ("set_tensor_address", "create_execution_context")]
    assert rel(out2, _trt_reference(plan, noise2, text)) <= 1e-3 and rel(out2, out) > 1e-2


def test_a_second_sampler_never_rebinds_a_captured_context(monkeypatch):
    """Two samplers (plans) over the same engines: each binding set gets its own context."""
    from test_trt_engine import LATENT
    from test_trt_engine import TEXT as TRT_TEXT

    trt, engines = _trt_pair(monkeypatch)
    plan_a, plan_b = BlendPlan.parse("LSL:0.4,0.2", STEPS), BlendPlan.parse("LLL", STEPS)
    runner_a = GraphRunner(Sampler(engines, plan_a, SamplerOptions(guidance_scale=4.0)), backend=FakeGraphBackend())
    runner_b = GraphRunner(Sampler(engines, plan_b, SamplerOptions(guidance_scale=4.0)), backend=FakeGraphBackend())
    g = torch.Generator().manual_seed(4)
    noise, text = torch.randn(1, *LATENT, generator=g), torch.randn(1, *TRT_TEXT, generator=g)
    runner_a.sample(noise, text, text)
    out_b = runner_b.sample(noise, text, text)  # binds both engines to B's buffers: new contexts, A's untouched
    out_a = runner_a.sample(noise, text, text)  # A's graph still replays into A's buffers
    assert rel(out_a, _trt_reference(plan_a, noise, text)) <= 1e-3
    assert rel(out_b, _trt_reference(plan_b, noise, text)) <= 1e-3
    assert len(trt.events("create_execution_context")) == 4 and all(len(e.contexts) == 2 for e in engines.values())


def test_torch_graph_backend_captures_every_graph_into_one_pool(monkeypatch):
    """TorchGraphBackend passes one graph_pool_handle() to every capture_begin (per-step graphs share memory)."""
    calls = []

    class Graph:
        def capture_begin(self, pool=None, **kw):
            calls.append(pool)

        def capture_end(self):
            pass

    class Stream:
        def __init__(self, device=None):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: __import__("contextlib").nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", 1))
    backend = TorchGraphBackend(torch.device("cuda", 0))
    for _ in range(3):
        backend.end_capture(backend.begin_capture(None))
    assert calls == [("pool", 1)] * 3


def test_cli_generate_graph_needs_cuda(tmp_path, capsys):
    from flowblend.cli.main import main

    out = tmp_path / "v.mp4"
    assert main(["generate", "--prompt", "a red circle moving left", "--graph", "whole", "--steps", "2",
                 "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--graph whole captures CUDA graphs: pass --device cuda" in err
    assert not out.exists()
