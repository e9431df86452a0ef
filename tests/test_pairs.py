"""Pair registry: shape rules, loading real diffusers checkpoints from disk, refusing incompatible pairs."""
import pytest
import torch
from tiny_models import WAN_TINY, tiny_pair

from flowblend.errors import FlowblendError
from flowblend.families import FAMILIES, check_compatible, get_family, load_pair


def test_families_and_defaults():
    assert set(FAMILIES) == {"wan", "wan22", "ltx", "toy"}
    wan, ltx = get_family("wan"), get_family("ltx")
    assert (wan.solver, wan.shift, wan.steps) == ("unipc", 3.0, 50)
    assert ltx.solver == "euler" and ltx.dynamic_shift
    # Wan VAE: 4x temporal, 8x spatial, 16 channels; 81 frames at 480x832 -> 21 x 60 x 104
    assert wan.latent_shape(81, 480, 832) == (16, 21, 60, 104)
    # LTX VAE: 8x temporal, 32x spatial, 128 channels
    assert ltx.latent_shape(121, 512, 704) == (128, 16, 16, 22)
    # toy: pixels are latents; the transformer patches 3 frames at a time, so 3 and 12 frames work too
    assert get_family("toy").latent_shape(12, 32, 64) == (3, 12, 32, 64)


@pytest.mark.parametrize("family,frames,h,w,match", [
    ("wan", 80, 480, 832, "4k\\+1"), ("wan", 81, 481, 832, "multiples of 16"), ("ltx", 120, 512, 704, "8k\\+1"),
    ("ltx", 121, 500, 704, "multiples of 32"), ("toy", 9, 30, 32, "multiples of 4"),
    ("toy", 7, 32, 32, "multiple of 3 latent frames, got 7; try 6 or 9"),  # patch (3, 4, 4)
])
def test_bad_video_shapes_name_the_fix(family, frames, h, w, match):
    with pytest.raises(FlowblendError, match=match):
        get_family(family).latent_shape(frames, h, w)


def test_unknown_pair():
    with pytest.raises(FlowblendError, match="choose one of wan, wan22, ltx, toy"):
        get_family("sdxl")


def _save_wan_checkpoints(tmp_path, small_cfg=None):
    models = tiny_pair("wan")
    if small_cfg is not None:
        from diffusers import WanTransformer3DModel
        models["small"] = WanTransformer3DModel(**small_cfg)
    for name, m in models.items():
        m.save_pretrained(tmp_path / name / "transformer")
    return models


def test_load_wan_pair_from_local_checkpoints(tmp_path):
    saved = _save_wan_checkpoints(tmp_path)
    pair = load_pair("wan", str(tmp_path / "large"), str(tmp_path / "small"))
    for name in ("large", "small"):
        for (k, a), (_, b) in zip(saved[name].state_dict().items(), pair.transformers[name].state_dict().items()):
            assert torch.equal(a, b), k


def test_incompatible_pair_names_the_field(tmp_path):
    _save_wan_checkpoints(tmp_path, small_cfg=dict(WAN_TINY["small"], text_dim=24))
    with pytest.raises(FlowblendError, match="text_dim differs"):
        load_pair("wan", str(tmp_path / "large"), str(tmp_path / "small"))
    fam = get_family("ltx")
    with pytest.raises(FlowblendError, match="in_channels differs"):
        check_compatible(fam, {"in_channels": 128}, {"in_channels": 64})


def test_missing_checkpoint_path(tmp_path):
    with pytest.raises(FlowblendError, match="does not exist"):
        load_pair("wan", str(tmp_path / "nope"), str(tmp_path / "nope2"))


def test_toy_pair_loads_and_encodes():
    pair = load_pair("toy")
    embeds, mask = pair.encode_prompt(["a red circle moving left", ""])
    assert embeds.shape[0] == 2 and mask[0].sum() == 5 and mask[1].sum() == 0
    assert torch.all(embeds[1] == 0)  # the empty prompt is all padding
