"""The step loop allocates nothing: every op in it writes into an existing tensor or is a view."""
import numpy as np
import torch
from tiny_models import TEXT, WAN_LATENT, tiny_pair
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from flowblend.engines.base import LATENTS, VELOCITY
from flowblend.engines.torch_engine import TorchEngine
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions

# Ops that make a tensor from Python/NumPy data: aten sees only `lift_fresh` (an alias of a tensor made
# before dispatch), so the schema check below misses them; the torch functions are caught too.
FACTORY_OPS = ("lift_fresh", "lift_fresh_copy", "lift")
FACTORY_FUNCTIONS = {"tensor", "as_tensor", "asarray", "from_numpy", "new_tensor", "frombuffer", "from_dlpack"}


class _Factories(TorchFunctionMode):
    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in FACTORY_FUNCTIONS and not self.recorder.paused:
            self.recorder.allocating.append(f"torch.{func.__name__}")
        return func(*args, **(kwargs or {}))


class AllocationRecorder(TorchDispatchMode):
    """Records every aten op whose result is not an alias of an existing tensor (i.e. new storage), and every
    tensor made from Python data (torch.tensor, new_tensor, as_tensor, from_numpy). `paused()` leaves out a
    real transformer's forward (its activations are the model's working memory, a graph pool's)."""

    def __init__(self):
        super().__init__()
        self.allocating = []
        self.ops = 0
        self.paused = 0
        self._factories = _Factories(self)

    def __enter__(self):
        self._factories.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._factories.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops += 1
            name = func.__name__.split(".")[0]
            if name in FACTORY_OPS or not all(r.alias_info is not None for r in func._schema.returns):
                self.allocating.append(str(func))
        return func(*args, **(kwargs or {}))

    def pause_inside(self, fn):
        def paused(*args, **kwargs):
            self.paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused -= 1
        return paused


class InPlaceEngine:
    """Stand-in engine that computes velocity with an out= op, so only the runtime's own ops remain."""

    input_names = ("latents", "timestep", "text_embeds")
    output_names = ("velocity",)
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, scale):
        self.scale = scale

    def bind(self, tensors):
        self.inp, self.out = tensors[LATENTS], tensors[VELOCITY]

    def run(self, step):
        torch.mul(self.inp, self.scale, out=self.out)


def test_step_loop_allocates_nothing():
    engines = {"large": InPlaceEngine(0.5), "small": InPlaceEngine(-0.25)}
    for solver in ("unipc", "euler", "dpm++", "dpm++3m"):
        for guidance in (1.0, 5.0):
            sampler = Sampler(engines, BlendPlan.parse("LSL:0.4,0.2", 10),
                              SamplerOptions(solver=solver, guidance_scale=guidance))
            noise, text = torch.randn(1, *WAN_LATENT), torch.randn(1, *TEXT)
            sampler.load_request(noise, text, text if guidance > 1 else None)
            rec = AllocationRecorder()
            with rec:
                sampler.run_loop()
            assert rec.ops >= 20  # at least engine + solver op per step were seen
            assert rec.allocating == [], f"{solver} g={guidance}: allocating ops in the loop: {rec.allocating}"


class FactoryEngine(InPlaceEngine):
    """A step that makes a tensor from Python data each time (a CUDA graph would replay a stale copy)."""

    def run(self, step):
        torch.mul(self.inp, torch.tensor(self.scale), out=self.out)


def _loop_allocations(engines, solver="unipc", guidance=5.0, pause=False):
    sampler = Sampler(engines, BlendPlan.parse("LSL:0.4,0.2", 6), SamplerOptions(solver=solver, guidance_scale=guidance))
    noise, text = torch.randn(1, *WAN_LATENT), torch.randn(1, *TEXT)
    sampler.load_request(noise, text, text)
    rec = AllocationRecorder()
    if pause:  # the transformers' own forwards; the engine's copy into the bound velocity stays recorded
        for engine in engines.values():
            if engine.step_split is not None:
                engine.step_split = rec.pause_inside(engine.step_split)
            else:
                engine.module = rec.pause_inside(engine.module)
    before = sampler.buffers.addresses()
    with rec:
        sampler.run_loop()
    assert sampler.buffers.addresses() == before  # same storage: nothing was re-made behind the recorder
    return rec


def test_a_step_that_makes_a_tensor_from_python_data_is_caught():
    """Control: torch.tensor inside the step (the recorder saw only an aliasing lift_fresh before issue 35)."""
    rec = _loop_allocations({"large": FactoryEngine(0.5), "small": FactoryEngine(-0.25)})
    assert rec.allocating and all(a in ("torch.tensor", "aten.lift_fresh.default") for a in rec.allocating)
    for make in (lambda x: x.new_tensor([1.0]), lambda x: torch.as_tensor([1.0]),
                 lambda x: torch.from_numpy(np.ones(2, dtype=np.float32))):
        rec = AllocationRecorder()
        x = torch.ones(2)
        with rec:
            make(x)
        assert rec.allocating, "a tensor from Python data went unseen"


def test_the_loop_over_the_real_torch_engines_allocates_nothing_outside_the_forward():
    """TorchEngine on the tiny Wan pair: the runtime's ops and the engine's own (timestep row, copy into the
    bound velocity) allocate nothing; only the transformer forward itself is left out."""
    engines = {n: TorchEngine(m) for n, m in tiny_pair("wan").items()}
    rec = _loop_allocations(engines, pause=True)
    assert rec.ops >= 12 and rec.allocating == [], rec.allocating


def test_recorder_catches_an_allocation():
    rec = AllocationRecorder()
    x = torch.ones(3)
    with rec:
        x.add_(1)
        _ = x * 2
    assert len(rec.allocating) == 1


def test_buffer_addresses_never_change_across_requests():
    models = tiny_pair("wan")
    engines = {n: TorchEngine(m) for n, m in models.items()}
    sampler = Sampler(engines, BlendPlan.parse("LSL:0.4,0.2", 6), SamplerOptions(guidance_scale=3.0))
    text = torch.randn(1, *TEXT)
    sampler.sample(torch.randn(1, *WAN_LATENT), text, text)
    before = sampler.buffers.addresses()
    # both engines are bound to the very same tensors
    assert engines["large"]._velocity is engines["small"]._velocity is sampler.buffers.velocity
    assert engines["large"]._inputs[0] is engines["small"]._inputs[0] is sampler.buffers.model_input
    sampler.sample(torch.randn(1, *WAN_LATENT), text, torch.randn(1, *TEXT))
    assert sampler.buffers.addresses() == before


def test_a_cached_loop_allocates_nothing_outside_the_forward_and_keeps_its_residual_buffers():
    """Issue 34: cached steps (lower-case letters) on the tiny Wan pair; the residual buffers are made at binding."""
    engines = {n: TorchEngine(m) for n, m in tiny_pair("wan").items()}
    sampler = Sampler(engines, BlendPlan.parse("LLllSsLl", 8), SamplerOptions(guidance_scale=4.0))
    noise, text = torch.randn(1, *WAN_LATENT), torch.randn(1, *TEXT)
    sampler.load_request(noise, text, text)
    residuals = {n: e._parts[0]["residual"] for n, e in engines.items()}
    assert all(r is not None and r.shape[0] == 2 for r in residuals.values())  # at the CFG batch
    rec = AllocationRecorder()
    for engine in engines.values():
        engine.step_split = rec.pause_inside(engine.step_split)
    before = sampler.buffers.addresses()
    with rec:
        sampler.run_loop()
    assert rec.ops >= 8 and rec.allocating == [], rec.allocating
    assert sampler.buffers.addresses() == before
    assert all(engines[n]._parts[0]["residual"] is r for n, r in residuals.items())
