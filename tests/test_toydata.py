"""Procedural toy data: deterministic, in range, and moving the way the prompt says."""
import numpy as np
import pytest

from flowblend.toy.data import PromptSpec, all_prompts, render, sample_batch


def test_vocabulary_covers_every_combination():
    specs = all_prompts()
    assert len(specs) == 6 * 3 * 4 == len(set(specs))
    assert PromptSpec.parse("a red circle moving left") == PromptSpec("red", "circle", "left")


def test_deterministic_per_seed_and_different_across_seeds():
    spec = PromptSpec("blue", "triangle", "up")
    a, b, c = render(spec, 1), render(spec, 1), render(spec, 2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == (3, 9, 32, 32) and a.dtype == np.float32
    assert a.min() == -1.0 and a.max() == 1.0


@pytest.mark.parametrize("direction,axis,sign", [("left", 1, -1), ("right", 1, 1), ("up", 0, -1), ("down", 0, 1)])
def test_shape_moves_as_prompted_and_stays_inside(direction, axis, sign):
    for seed in range(10):
        v = render(PromptSpec("green", "square", direction), seed)
        mask = v.max(axis=0) > 0
        centres = [np.argwhere(m).mean(axis=0)[axis] for m in mask]  # (y, x) -> pick axis
        assert sign * (centres[-1] - centres[0]) > 5
        # fully visible: no foreground touching the border
        assert not mask[:, 0, :].any() and not mask[:, -1, :].any()
        assert not mask[:, :, 0].any() and not mask[:, :, -1].any()


def test_colour_is_the_prompted_one():
    v = render(PromptSpec("yellow", "circle", "left"), 0)
    fg = v[:, v.max(axis=0) > 0]
    assert np.allclose(fg.mean(axis=1), [1, 1, -1])


def test_batches_are_reproducible():
    a, ta = sample_batch(np.random.default_rng(3), 4)
    b, tb = sample_batch(np.random.default_rng(3), 4)
    assert np.array_equal(a, b) and ta == tb and a.shape == (4, 3, 9, 32, 32)


def test_unknown_words_are_refused():
    with pytest.raises(ValueError, match="vocabulary"):
        PromptSpec("purple", "circle", "left")
    with pytest.raises(ValueError, match="needs a colour"):
        PromptSpec.parse("a circle")


@pytest.mark.parametrize("name,radius,speed", [("v1", (5.0, 7.0), (1.2, 2.0)), ("v2", (7.0, 9.5), (0.8, 1.3))])
def test_geometries_draw_the_sizes_and_speeds_they_name(name, radius, speed):
    from flowblend.toy.data import GEOMETRIES
    from flowblend.toy.probes import centroid_track, foreground_masks

    for seed in range(20):
        v = render(PromptSpec("red", "circle", "right"), seed, geometry=GEOMETRIES[name])
        masks = foreground_masks(v)
        r = np.sqrt(masks[0].sum() / np.pi)  # the pixel circle's area is pi r^2 to within a pixel ring
        assert radius[0] - 0.5 <= r <= radius[1] + 0.5
        step = np.diff(centroid_track(masks)[:, 0]).mean()
        assert speed[0] - 0.1 <= step <= speed[1] + 0.1
    square = foreground_masks(render(PromptSpec("red", "square", "up"), 3, geometry=GEOMETRIES[name]))[0]
    ys, xs = np.nonzero(square)
    assert square.sum() == (np.ptp(xs) + 1) * (np.ptp(ys) + 1)  # axis-aligned and filled
