"""README's Python blocks run as written, in order, on the toy pair: the README cannot drift from the API."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 3


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    after = []
    for i, block in enumerate(python_blocks()):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        after.append(dict(namespace))
    # the diffusers-style block: frames of the toy's default size, a video file, the plan it was asked for
    diffusers_block = after[0]
    assert len(diffusers_block["frames"]) == 9 and diffusers_block["frames"][0].shape == (32, 32, 3)
    assert (tmp_path / "red_circle.mp4").stat().st_size > 0
    # what the other blocks claim: the plan, shapes, the normalised prompt, the printed line, a file written
    first, last = after[1], after[-1]
    assert first["sampler"].plan.label == "L8,S8,L4"
    assert tuple(first["latents"].shape) == (1, 3, 9, 32, 32) and tuple(first["video"].shape) == (1, 3, 9, 32, 32)
    assert last["request"].prompts == ("a red circle moving left",)
    assert "('a red circle moving left',) (3, 9, 32, 32)" in capsys.readouterr().out
    assert tuple(last["video"].shape) == (3, 9, 32, 32) and (tmp_path / "red_circle.gif").stat().st_size > 0
    # the pipeline draws the same seed-0 noise as block 1 and encodes the same prompt: same latents
    assert torch.allclose(last["latents"], first["latents"], atol=1e-6)
    # and so does the diffusers-style class (LSL:0.4,0.2, 20 steps, CFG 4.0, seed 0): the same video
    video = ((last["video"] + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0).numpy()  # [F, H, W, 3] in [0, 1]
    assert abs(diffusers_block["frames"] - video).max() <= 1e-5


def test_shapes_with_and_without_batch_are_refused_with_the_fix():
    from flowblend.engines.torch_engine import TorchEngine
    from flowblend.errors import FlowblendError
    from flowblend.families import load_pair
    from flowblend.runtime.plan import BlendPlan
    from flowblend.runtime.sampler import Sampler, SamplerOptions
    from flowblend.runtime.text_to_video import TextToVideo

    pair = load_pair("toy")
    sampler = Sampler({"large": TorchEngine(pair.large), "small": TorchEngine(pair.small)}, BlendPlan.parse("LLL", 2),
                      SamplerOptions(guidance_scale=1.0))
    embeds, _ = pair.encode_prompt(["a red circle moving left"])
    with pytest.raises(FlowblendError, match=r"\[1, C, F, H, W\].*noise\[None\]"):
        sampler.sample(torch.randn(3, 9, 32, 32), embeds)
    with pytest.raises(FlowblendError, match="drop the batch"):
        TextToVideo(sampler, pair.encode_prompt, pair.decode)("a red circle moving left", (1, 3, 9, 32, 32))
    with pytest.raises(TypeError, match="list of prompts"):
        pair.encode_prompt("a red circle moving left")
