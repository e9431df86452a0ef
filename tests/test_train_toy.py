"""flowblend.toy.train helpers: stage logs joined in order, the outline band the edge-weighted loss uses."""
import json

import numpy as np
import torch

from flowblend.toy import train as train_toy
from flowblend.toy.data import PromptSpec, render


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


def _train(tmp_path, name, *extra):
    import sys
    argv = ["train_toy.py", "--size", "small", "--steps", "2", "--batch", "2", "--edge-weight", "4",
            "--work", str(tmp_path / name), "--out", str(tmp_path / f"{name}-weights"), *extra]
    old, sys.argv, threads = sys.argv, argv, torch.get_num_threads()
    try:
        train_toy.main()
    finally:  # main() sets the process's thread count and compiles: leave neither to later tests
        sys.argv = old
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    losses = [json.loads(line)["loss"] for line in (tmp_path / name / "small" / "loss.jsonl").read_text().splitlines()]
    return losses, torch.load(tmp_path / name / "small" / "checkpoint.pt", weights_only=False)["model"]


def test_compiled_training_takes_the_same_steps_as_eager(tmp_path):
    """--compile must only change the speed: same batches, same losses, same updated weights."""
    eager_losses, eager_weights = _train(tmp_path, "eager")
    compiled_losses, compiled_weights = _train(tmp_path, "compiled", "--compile")
    assert np.allclose(compiled_losses, eager_losses, rtol=1e-4)
    for name, w in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], w, rtol=1e-4, atol=1e-5, msg=name)
    assert (tmp_path / "compiled-weights" / "small" / "config.json").exists()
