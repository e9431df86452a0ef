"""Cached steps (issue 34): a cached step reuses the blocks' residual of its model's last full step.

The reference is diffusers' own forward, by hand: hooks read the first block's input and the last
block's output at the full step (their difference is the residual), and at the cached step the
block list is swapped for one module that adds that residual, so everything else of the forward
(embeddings, output norm, head) is diffusers' at the current step.
"""
import pytest
import torch
from test_step_split import _bindings, _diffusers_velocity
from tiny_models import LTX_LATENT, TEXT, WAN_LATENT, tiny_pair
from torch import nn

from flowblend.engines.base import VELOCITY
from flowblend.engines.step_cache import REUSE, STORE, CacheSchedule
from flowblend.engines.torch_engine import TorchEngine
from flowblend.errors import FlowblendError
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions

TIMESTEPS = [990.0, 800.0, 500.0, 200.0]
SHAPES = {"wan": WAN_LATENT, "ltx": LTX_LATENT}


def _blocks_attr(model):
    return "blocks" if hasattr(model, "blocks") else "transformer_blocks"


def _block_input_output(model, tensors, step):
    blocks, seen = getattr(model, _blocks_attr(model)), {}
    def read_input(module, args, kwargs):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).clone()

    first = blocks[0].register_forward_pre_hook(read_input, with_kwargs=True)
    last = blocks[-1].register_forward_hook(lambda m, args, out: seen.__setitem__("out", out.clone()))
    try:
        velocity = _diffusers_velocity(model, tensors, step)
    finally:
        first.remove()
        last.remove()
    return velocity, seen["out"] - seen["in"]


class _AddResidual(nn.Module):
    def __init__(self, residual):
        super().__init__()
        self.residual = residual

    def forward(self, *args, **kwargs):
        return (args[0] if args else kwargs["hidden_states"]) + self.residual


def _diffusers_with_residual(model, tensors, step, residual):
    attr = _blocks_attr(model)
    blocks = getattr(model, attr)
    setattr(model, attr, nn.ModuleList([_AddResidual(residual)]))
    try:
        return _diffusers_velocity(model, tensors, step)
    finally:
        setattr(model, attr, blocks)


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_a_cached_step_is_diffusers_forward_with_the_last_residual_added(family):
    model = tiny_pair(family)["large"]
    tensors = _bindings(SHAPES[family], TEXT, TIMESTEPS, batch=2, mask=family == "ltx")  # both CFG rows
    full_velocity, residual = _block_input_output(model, tensors, 1)
    expected = _diffusers_with_residual(model, tensors, 3, residual)
    engine = TorchEngine(model)
    engine.bind(tensors)
    engine.set_cache_schedule(CacheSchedule({1: STORE, 3: REUSE}))
    engine.run(1)
    assert torch.equal(tensors[VELOCITY], full_velocity)  # a storing step is the plain step, bit for bit
    engine.run(3)
    got = tensors[VELOCITY].clone()
    assert (got - expected).abs().max().item() <= 1e-6
    # control: the cached step is not the full step at 3, nor the step at 1
    full_at_3 = _diffusers_velocity(model, tensors, 3)
    assert (got - full_at_3).abs().max().item() > 1e-3 and (got - full_velocity).abs().max().item() > 1e-3


def test_a_schedule_reuses_the_last_full_step_of_its_model():
    plan = BlendPlan.parse("LLllSSsLl", 9)
    assert CacheSchedule.for_model(plan.models, plan.cached, "large").actions == {1: STORE, 2: REUSE, 3: REUSE,
                                                                                 7: STORE, 8: REUSE}
    assert CacheSchedule.for_model(plan.models, plan.cached, "small").actions == {5: STORE, 6: REUSE}


def _run(engines, plan, seed=0, guidance=4.0):
    g = torch.Generator().manual_seed(seed)
    noise, text, neg = (torch.randn((1, *s), generator=g) for s in (WAN_LATENT, TEXT, TEXT))
    return Sampler(engines, plan, SamplerOptions(guidance_scale=guidance)).sample(noise, text, neg)


def test_a_cached_plan_changes_only_what_it_caches_and_the_uncached_plan_is_unchanged():
    engines = {n: TorchEngine(m) for n, m in tiny_pair("wan").items()}
    plain = _run(engines, BlendPlan.parse("LLLSSSLL", 8))
    cached = _run(engines, BlendPlan.parse("LLlSSsLL", 8))
    again = _run(engines, BlendPlan.parse("LLLSSSLL", 8))  # engines shared: the schedule is the sampler's own
    assert torch.equal(plain, again)
    unsplit = {n: TorchEngine(m, split_constants=False) for n, m in tiny_pair("wan").items()}
    assert torch.equal(plain, _run(unsplit, BlendPlan.parse("LLLSSSLL", 8)))  # today's plain forward
    assert 0 < ((cached - plain).norm() / plain.norm()).item() < 0.5


def test_a_cached_plan_on_an_engine_without_the_split_is_refused_in_one_line():
    engines = {n: TorchEngine(m, split_constants=False) for n, m in tiny_pair("wan").items()}
    with pytest.raises(FlowblendError) as err:
        Sampler(engines, BlendPlan.parse("LLlSSL", 6), SamplerOptions(guidance_scale=4.0))
    assert "\n" not in str(err.value) and "--backend torch" in str(err.value)


class _WholeForwardEngine:
    """What OrtEngine / TrtEngine look like to the sampler: no step split, no cache schedule."""

    input_names, output_names = ("latents", "timestep", "text_embeds"), ("velocity",)
    device, dtype = torch.device("cpu"), torch.float32

    def bind(self, tensors):
        pass

    def run(self, step):
        pass


def test_whole_forward_engines_refuse_cached_steps_and_run_plain_plans():
    engines = {"large": _WholeForwardEngine(), "small": _WholeForwardEngine()}
    Sampler(engines, BlendPlan.parse("LLSSL", 5))
    with pytest.raises(FlowblendError, match="_WholeForwardEngine.*whole forward"):
        Sampler(engines, BlendPlan.parse("LLSsL", 5))


def test_a_cached_loop_replays_in_the_whole_loop_graph_as_eager():
    """Under the CUDA stand-ins (tests/fake_cuda_graph.py): captured once, replayed == eager, no host sync."""
    from fake_cuda_graph import FakeGraphBackend, watch_host_syncs

    from flowblend.runtime.graph import GraphRunner

    engines = {n: TorchEngine(m) for n, m in tiny_pair("wan").items()}
    plan, options = BlendPlan.parse("LLlSsL", 6), SamplerOptions(guidance_scale=4.0)
    g = torch.Generator().manual_seed(3)
    req = tuple(torch.randn((1, *s), generator=g) for s in (WAN_LATENT, TEXT, TEXT))
    backend = FakeGraphBackend()
    runner = GraphRunner(Sampler(engines, plan, options), mode="whole", backend=backend)
    replayed = runner.sample(*req)
    assert backend.events == ["warm_up", "begin", "end", "replay"]
    eager = Sampler(engines, plan, options)
    reference = eager.sample(*req)
    assert ((replayed - reference).norm() / reference.norm()).item() <= 1e-6
    eager.load_request(*req)
    with torch.no_grad(), watch_host_syncs() as syncs:
        eager.run_loop()
    assert syncs == []
    key_plain = GraphRunner(Sampler(engines, plan.full(), options), backend=FakeGraphBackend()).key(WAN_LATENT, TEXT)
    assert runner.key(WAN_LATENT, TEXT) != key_plain  # a cached plan is its own graph


def test_the_residual_buffers_are_the_memory_bounds_named_term():
    """One buffer per model with cached steps, at its CFG batch: rows x tokens x heads*head_dim x 4 bytes here."""
    from flowblend.bench.memory import MemoryBound
    from flowblend.bench.tiny import WAN_TINY

    engines = {n: TorchEngine(m) for n, m in tiny_pair("wan").items()}
    sampler = Sampler(engines, BlendPlan.parse("LLlSSL", 6), SamplerOptions(guidance_scale=4.0))
    g = torch.Generator().manual_seed(0)
    sampler.load_request(*(torch.randn((1, *s), generator=g) for s in (WAN_LATENT, TEXT, TEXT)))
    c, f, h, w = WAN_LATENT
    large = WAN_TINY["large"]
    tokens = f * (h // large["patch_size"][1]) * (w // large["patch_size"][2])
    assert engines["large"].residual_bytes() == 2 * tokens * large["num_attention_heads"] * large["attention_head_dim"] * 4
    assert engines["small"].residual_bytes() == 0  # no cached step of small: no buffer
    bound = MemoryBound(1, 2, 3, 4, cache_residuals=engines["large"].residual_bytes())
    assert bound.total == 10 + engines["large"].residual_bytes()
