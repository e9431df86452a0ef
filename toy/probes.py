"""Exact quality probes for toy videos: read colour, shape and motion back from the pixels.

No learned network: the procedural world is simple enough to measure directly, so a score is a
fact about the video, not another model's opinion. The shape probe compares the foreground with
the renderer's own circle, square and triangle of the same area and centroid (template IoU), so
ragged edges or a stray pixel in a generated video do not flip it (a bounding-box fill ratio did);
tests/test_probes.py checks every probe against rendered ground truth over the whole vocabulary.
"""
from __future__ import annotations

import numpy as np

from ..families.toy_vocab import COLOURS, SHAPES
from .data import COLOUR_RGB, PromptSpec, render, shape_mask

FOREGROUND_THRESHOLD = 0.0  # pixel value in [-1, 1]; the background is -1, every colour has a channel at +1


def _as_numpy(video) -> np.ndarray:
    if hasattr(video, "detach"):
        video = video.detach().float().cpu().numpy()
    video = np.asarray(video, np.float32)
    if video.ndim == 5:
        video = video[0]
    return video


def foreground_masks(video: np.ndarray) -> np.ndarray:
    """[F, H, W] bool: pixels brighter than the background in any channel."""
    return video.max(axis=0) > FOREGROUND_THRESHOLD


def read_colour(video: np.ndarray, masks: np.ndarray) -> str | None:
    if masks.sum() == 0:
        return None
    rgb = (video[:, masks].mean(axis=1) + 1) / 2  # mean foreground colour in [0, 1]
    return min(COLOURS, key=lambda c: float(np.sum((rgb - np.asarray(COLOUR_RGB[c])) ** 2)))


def fill_ratio(mask: np.ndarray) -> float | None:
    """Fraction of the mask's bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2).
    Kept as a diagnostic; read_shape uses template IoU, which one stray pixel cannot swing."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 4:
        return None
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    return float(len(xs) / box)


def template_ious(mask: np.ndarray) -> dict[str, float] | None:
    """IoU of the mask with each vocabulary shape of the same area and centroid, drawn by the
    renderer itself (data.shape_mask). None if the frame has (almost) no foreground."""
    ys, xs = np.nonzero(mask)
    area = len(xs)
    if area < 4:
        return None
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    size = mask.shape[0]
    # renderer geometry: circle radius r; square half-side square_half_side x r (the template is
    # drawn with half-side 1 x r_sq); triangle apex-up, base 2r and height 2r (area 2 r^2),
    # centroid 1/3 r below the box centre
    r_tri = np.sqrt(area / 2)
    templates = {
        "circle": shape_mask("circle", cx, cy, np.sqrt(area / np.pi), size),
        "square": shape_mask("square", cx, cy, np.sqrt(area) / 2, size, square_half_side=1.0),
        "triangle": shape_mask("triangle", cx, cy - r_tri / 3, r_tri, size),
    }
    return {name: float((t & mask).sum() / max(1, (t | mask).sum())) for name, t in templates.items()}


def read_shape(masks: np.ndarray) -> str | None:
    """The shape whose template overlaps the foreground best, summed over frames."""
    totals = dict.fromkeys(SHAPES, 0.0)
    seen = False
    for m in masks:
        ious = template_ious(m)
        if ious is None:
            continue
        seen = True
        for name, iou in ious.items():
            totals[name] += iou
    return max(totals, key=totals.get) if seen else None


def centroid_track(masks: np.ndarray) -> np.ndarray:
    """[F, 2] (x, y) centroid per frame; NaN where a frame has no foreground."""
    track = np.full((len(masks), 2), np.nan, np.float32)
    for t, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(xs):
            track[t] = (xs.mean(), ys.mean())
    return track


def read_direction(masks: np.ndarray, min_travel: float = 1.5) -> str | None:
    track = centroid_track(masks)
    ok = ~np.isnan(track[:, 0])
    if ok.sum() < 2:
        return None
    t = np.nonzero(ok)[0].astype(np.float32)
    vx = np.polyfit(t, track[ok, 0], 1)[0]
    vy = np.polyfit(t, track[ok, 1], 1)[0]
    if max(abs(vx), abs(vy)) * (len(masks) - 1) < min_travel:
        return None  # no clear motion
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, xs = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
    src_y, src_x = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    out[ys, xs] = mask[src_y, src_x]
    return out


def temporal_coherence(masks: np.ndarray) -> float:
    """In [0, 1]: mean IoU of consecutive foregrounds after following the shape's motion, times the
    fraction of steps whose displacement agrees (within 1 px) with the video's median step.
    A steady moving shape scores near 1; flicker, deformation or shuffled frames score low."""
    track = centroid_track(masks)
    if np.isnan(track).any():
        return 0.0
    steps = np.diff(track, axis=0)
    median = np.median(steps, axis=0)
    steady = float(np.mean(np.linalg.norm(steps - median, axis=1) <= 1.0))
    ious = []
    for t in range(len(masks) - 1):
        dx, dy = np.round(steps[t]).astype(int)
        moved = _shift(masks[t], dx, dy)
        union = (moved | masks[t + 1]).sum()
        ious.append((moved & masks[t + 1]).sum() / union if union else 0.0)
    return float(np.mean(ious)) * steady


def score_video(video, spec: PromptSpec) -> dict:
    """Per-video readings and whether each matches the prompt."""
    v = _as_numpy(video)
    masks = foreground_masks(v)
    colour, shape, direction = read_colour(v, masks), read_shape(masks), read_direction(masks)
    return {"colour": colour, "shape": shape, "direction": direction,
            "colour_ok": colour == spec.colour, "shape_ok": shape == spec.shape,
            "direction_ok": direction == spec.direction,
            "semantic_ok": (colour, shape, direction) == (spec.colour, spec.shape, spec.direction),
            "coherence": temporal_coherence(masks)}


# -- fidelity: Frechet distance in a fixed random-projection feature space ------------------------
FEATURE_DIM = 32
FEATURE_SEED = 1234


def video_features(videos) -> np.ndarray:
    """Fixed encoder: 4x4 block means (layout), their frame differences (motion) and the standard
    deviations of 2x2 blocks averaged per 4x4 block (texture: where noise and blur show; 2x2 so a
    large shape's edges weigh less against noise than in 4x4 blocks), projected to FEATURE_DIM by a
    seeded Gaussian matrix. Deterministic, no training."""
    feats = []
    for video in videos:
        v = _as_numpy(video)
        c, f, h, w = v.shape
        pooled = v.reshape(c, f, h // 4, 4, w // 4, 4).mean(axis=(3, 5))
        motion = np.diff(pooled, axis=1)
        texture = v.reshape(c, f, h // 2, 2, w // 2, 2).std(axis=(3, 5)).reshape(c, f, h // 4, 2, w // 4, 2).mean(axis=(3, 5))
        feats.append(np.concatenate([pooled.ravel(), motion.ravel(), 2 * texture.ravel()]))
    x = np.stack(feats)
    proj = np.random.default_rng(FEATURE_SEED).standard_normal((x.shape[1], FEATURE_DIM)) / np.sqrt(x.shape[1])
    return x @ proj


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance of two feature sets; NaN below 2 videos a side, where no covariance exists."""
    from scipy import linalg

    if min(len(feats_a), len(feats_b)) < 2:
        return float("nan")  # `flowblend demo --prompt X` with one seed: every other score still stands
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * covmean))


def reference_videos(specs: list[PromptSpec], seed_offset: int = 10_000, frames: int = 9) -> list[np.ndarray]:
    """Real procedural videos of the same prompts with seeds no evaluation uses."""
    return [render(s, seed_offset + i, frames) for i, s in enumerate(specs)]


def score_set(videos, specs: list[PromptSpec], reference=None) -> dict:
    """Accuracies per attribute, semantic accuracy (all three right), mean coherence and the Frechet
    distance to real videos of the same prompts (other seeds)."""
    if len(videos) != len(specs):
        raise ValueError(f"{len(videos)} videos but {len(specs)} prompt specs")
    per_video = [score_video(v, s) for v, s in zip(videos, specs)]
    frames = _as_numpy(videos[0]).shape[1]
    reference = reference if reference is not None else reference_videos(specs, frames=frames)
    mean = lambda key: float(np.mean([p[key] for p in per_video]))  # noqa: E731
    return {"colour_acc": mean("colour_ok"), "shape_acc": mean("shape_ok"), "direction_acc": mean("direction_ok"),
            "semantic_acc": mean("semantic_ok"), "coherence": mean("coherence"),
            "frechet": frechet_distance(video_features(videos), video_features(reference))}


SCORE_KEYS = ("semantic_acc", "colour_acc", "shape_acc", "direction_acc", "coherence", "frechet")
