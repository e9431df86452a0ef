"""The probes read real procedural videos right, and notice every kind of corruption."""
import numpy as np
import pytest

from flowblend.toy.data import COLOUR_RGB, PromptSpec, all_prompts, render
from flowblend.toy.probes import score_set, score_video

SPECS = all_prompts()


@pytest.fixture(scope="module")
def real():
    return [render(s, 100 + i) for i, s in enumerate(SPECS)]


def test_real_videos_score_perfectly(real):
    scores = score_set(real, SPECS)
    assert scores["semantic_acc"] == 1.0
    assert scores["coherence"] > 0.85
    assert scores["frechet"] < 1.0  # sampling noise of 72 vs 72 videos in 32 dims


def test_wrong_colour_is_noticed(real):
    swapped = []
    for v, s in zip(real, SPECS):
        v = v.copy()
        other = "blue" if s.colour != "blue" else "red"
        fg = v.max(axis=0) > 0
        v[:, fg] = (2 * np.asarray(COLOUR_RGB[other], np.float32) - 1)[:, None]
        swapped.append(v)
    assert score_set(swapped, SPECS)["colour_acc"] == 0.0


def test_wrong_shape_is_noticed():
    for s in SPECS[::5]:
        other = {"circle": "square", "square": "triangle", "triangle": "circle"}[s.shape]
        video = render(PromptSpec(s.colour, other, s.direction), 7)
        result = score_video(video, s)
        assert not result["shape_ok"] and result["colour_ok"] and result["direction_ok"]


def test_reversed_time_flips_direction(real):
    reversed_ = [v[:, ::-1] for v in real]
    assert score_set(reversed_, SPECS)["direction_acc"] == 0.0


def test_shuffled_frames_lose_coherence(real):
    rng = np.random.default_rng(0)
    shuffled = [v[:, rng.permutation(v.shape[1])] for v in real]
    assert score_set(shuffled, SPECS)["coherence"] < 0.5 * score_set(real, SPECS)["coherence"]


def test_blank_and_static_videos_fail(real):
    blank = np.full_like(real[0], -1.0)
    assert not score_video(blank, SPECS[0])["semantic_ok"]
    static = np.repeat(real[0][:, :1], real[0].shape[1], axis=1)
    assert score_video(static, SPECS[0])["direction"] is None


def test_noise_raises_frechet_distance(real):
    rng = np.random.default_rng(1)
    noisy = [np.clip(v + rng.normal(0, 0.4, v.shape), -1, 1).astype(np.float32) for v in real]
    assert score_set(noisy, SPECS)["frechet"] > 3 * score_set(real, SPECS)["frechet"]


def test_shape_survives_ragged_edges(real):
    """Generated shapes have ragged borders and stray pixels; the shape reading must not flip on them."""
    from scipy import ndimage

    rng = np.random.default_rng(2)
    for v, s in list(zip(real, SPECS))[::3]:
        v = v.copy()
        fg = v.max(axis=0) > 0
        for t in range(v.shape[1]):
            edge = fg[t] ^ ndimage.binary_erosion(fg[t])
            drop = edge & (rng.random(edge.shape) < 0.3)
            v[:, t][:, drop] = -1.0
            stray = rng.integers(0, 32, 2)
            v[:, t, stray[0], stray[1]] = v[:, t][:, fg[t]][:, 0]
        assert score_video(v, s)["shape_ok"], s.text
