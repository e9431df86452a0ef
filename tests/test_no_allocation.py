"""The step loop allocates nothing: every op in it writes into an existing tensor or is a view."""
import torch
from tiny_models import TEXT, WAN_LATENT, tiny_pair
from torch.utils._python_dispatch import TorchDispatchMode

from flowblend.engines.base import LATENTS, VELOCITY
from flowblend.engines.torch_engine import TorchEngine
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions


class AllocationRecorder(TorchDispatchMode):
    """Records every aten op whose result is not an alias of an existing tensor (i.e. new storage)."""

    def __init__(self):
        super().__init__()
        self.allocating = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if not all(r.alias_info is not None for r in func._schema.returns):
            self.allocating.append(str(func))
        return func(*args, **(kwargs or {}))


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
