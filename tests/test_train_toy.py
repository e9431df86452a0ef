"""scripts/train_toy.py helpers: stage logs joined in order, the outline band the edge-weighted loss uses."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from flowblend.calibrate.toydata import PromptSpec, render

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("train_toy", ROOT / "scripts" / "train_toy.py")
train_toy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_toy)


def test_stage_logs_follow_each_other_and_a_resumed_step_keeps_its_last_value(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps({"step": s, "loss": v}) for s, v in [(0, 1.0), (1, 0.9), (1, 0.8), (2, 0.7)]))
    b.write_text("\n".join(json.dumps({"step": s, "loss": v}) for s, v in [(0, 0.6), (1, 0.5)]))
    steps, loss, starts = train_toy.read_stage_logs([a, b])
    assert steps.tolist() == [0, 1, 2, 3, 4] and loss.tolist() == [1.0, 0.8, 0.7, 0.6, 0.5] and starts == [3]


def test_outline_band_is_the_pixels_within_two_of_the_outline():
    from scipy import ndimage

    video = render(PromptSpec("red", "square", "left"), 4)
    band = train_toy.outline_band(torch.from_numpy(video)[None])[0, 0].numpy() > 0
    fg = video.max(axis=0) > 0
    for t in range(video.shape[1]):
        # reference: chessboard distance to the other side of the outline, for pixels on either side
        inside = ndimage.distance_transform_cdt(fg[t], metric="chessboard")
        outside = ndimage.distance_transform_cdt(~fg[t], metric="chessboard")
        expected = np.where(fg[t], inside <= 2, outside <= 2)
        assert (band[t] == expected).all()
