"""--offload (families/offload.py): where the text encoder and VAE sit during the loop, in the memory plan
(bench/memory_plan.py) and in an assembled run (families/loading.py), issue 32 item 1."""
import dataclasses

import pytest
import torch

from flowblend.assembly import EngineChoice, assemble
from flowblend.bench.memory_plan import GIB, plan_memory, planned_shared_parts
from flowblend.families import FAMILIES, get_family
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import SamplerOptions

# docs/gpu-runs/2026-12-04-h200/runner-report/gpu-run.json, the memory check: the Wan 2.1 VAE (diffusers'
# defaults) in FP16 on the H200, torch.cuda.memory_allocated around it, and its decode of latents [16, 5, 60, 104]
VAE_WEIGHTS_MEASURED = 253815808
VAE_DECODE_PEAK_MEASURED = 4800793088  # from before the VAE loaded: its weights + the decode
UMT5_XXL_FP16 = 11361820672  # UMT5-XXL's parameters x 2 (transformers' own model from the published config)


def test_the_shared_parts_planned_against_the_h200_and_transformers():
    parts = planned_shared_parts(get_family("wan"), "fp16", (16, 5, 60, 104))
    encoder, _ = parts["text encoder"]
    vae, decode = parts["VAE"]
    # FP16 keeps UMT5's `wo` in FP32 (transformers' _keep_in_fp32_modules): 24 layers x 4096 x 10240 more bytes x 2
    assert encoder == UMT5_XXL_FP16 + 2 * 24 * 4096 * 10240
    assert vae == pytest.approx(VAE_WEIGHTS_MEASURED, rel=1e-3)
    # the decode as planned (3 latent frames on the meta device, the last 2 frames' output added) against the
    # measured peak: 10% under it (cuDNN's conv workspaces and the allocator's blocks are not seen on meta)
    measured = VAE_DECODE_PEAK_MEASURED - VAE_WEIGHTS_MEASURED
    assert 0.85 * measured < decode <= measured, decode / measured


def _wan_plan(offload):
    family = get_family("wan")
    return plan_memory(family, ("large", "small"), family.latent_shape(81, 480, 832), "fp8", 2, (1.0,) * 50,
                       offload=offload)


def test_offload_moves_the_text_encoder_and_vae_terms_out_of_the_loop():
    none, swap, cpu = (_wan_plan(o) for o in ("none", "swap", "cpu"))
    encoder, _ = cpu.shared["text encoder"]
    vae, _ = cpu.shared["VAE"]
    assert encoder > 10 * GIB and vae > 0.2 * GIB  # UMT5-XXL in BF16, the Wan VAE
    assert none.phases()["loop"] - cpu.phases()["loop"] == encoder + vae
    assert swap.phases()["loop"] == cpu.phases()["loop"] == cpu.bound.total
    assert swap.phases()["encode"] - cpu.phases()["encode"] > encoder  # swap encodes on the device, cpu does not
    assert none.total > swap.total >= cpu.total
    assert _wan_plan(None).phases().keys() == {"load", "loop"}  # bench's harness: no text encoder or VAE


@pytest.fixture
def tiny_wan(tmp_path, monkeypatch):
    """A Wan family over a tiny complete checkpoint (UMT5, Wan VAE, transformer: tests/tiny_checkpoints.py)."""
    from tiny_checkpoints import TEXT_DIM, WAN_CHANNELS, save_wan

    folder = save_wan(tmp_path / "wan", small=True)
    family = dataclasses.replace(get_family("wan"), name="wan-tiny-offload", text_len=16, text_dim=TEXT_DIM,
                                 latent_channels=WAN_CHANNELS, height=32, width=32, frames=5, steps=3)
    monkeypatch.setitem(FAMILIES, family.name, family)
    return family, str(folder)


@pytest.mark.parametrize("offload", ["swap", "cpu", "none"])
def test_an_assembled_run_holds_the_text_encoder_off_the_device_during_the_loop(offload, tiny_wan, monkeypatch):
    """Every .to of the text encoder and the VAE, each encode and decode, and each step are recorded in order:
    with swap the text encoder goes back to the CPU after encoding and before step 0, and the VAE comes to the
    device only after the last step; with cpu neither moves; with none both move once, at loading, and stay."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    family, folder = tiny_wan
    events = []
    parts = {UMT5EncoderModel: "text encoder", AutoencoderKLWan: "VAE"}
    original_to = torch.nn.Module.to

    def recorded_to(module, *args, **kwargs):
        if type(module) in parts:
            events.append((parts[type(module)], "to"))
        return original_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recorded_to)
    for cls, method in ((UMT5EncoderModel, "forward"), (AutoencoderKLWan, "decode")):
        def recording(self, *args, _run=getattr(cls, method), **kwargs):
            events.append((parts[type(self)], "runs"))
            return _run(self, *args, **kwargs)
        monkeypatch.setattr(cls, method, recording)

    latent = family.latent_shape(family.frames, family.height, family.width)
    run = assemble(family.name, latent, BlendPlan.parse("LSL", 3), SamplerOptions(guidance_scale=4.0),
                   EngineChoice(offload=offload), large=folder, small=folder)
    video, _ = run.pipeline("a red circle moving left", latent, on_step=lambda i: events.append(("loop", i)))
    assert video.shape[1:] == (family.frames, family.height, family.width)
    first, last = events.index(("loop", 0)), events.index(("loop", 2))
    before, after = events[:first], events[last + 1:]
    encoder = [e for _, e in (x for x in before if x[0] == "text encoder")]
    vae_before = [e for p, e in before if p == "VAE"]
    vae_after = [e for p, e in after if p == "VAE"]
    assert all(p != "text encoder" for p, _ in events[first:]), events  # never touched during or after the loop
    if offload == "swap":
        assert encoder == ["to", "runs", "to"] and vae_before == [] and vae_after == ["to", "runs", "to"]
    elif offload == "cpu":
        assert encoder == ["runs"] and vae_before == [] and vae_after == ["to", "runs", "to"]
    else:
        assert encoder == ["to", "runs"] and vae_before == ["to"] and vae_after == ["runs"]


def test_an_unknown_offload_mode_is_one_line_naming_the_modes(capsys):
    from flowblend.cli.main import main
    from flowblend.errors import FlowblendError

    with pytest.raises(FlowblendError, match=r"^unknown --offload 'gpu': choose one of none, swap, cpu$"):
        EngineChoice(offload="gpu")
    with pytest.raises(SystemExit):  # the flag's declared choices: argparse's usage error, before anything loads
        main(["generate", "--prompt", "a red circle moving left", "--offload", "gpu", "--out", "never.gif"])
    assert "--offload: invalid choice: 'gpu'" in capsys.readouterr().err
