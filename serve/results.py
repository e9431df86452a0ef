"""A finished job's files: the video and its first frame as a thumbnail, each written to a temporary name and renamed.

A video whose values are not finite (an update that overflowed: a huge guidance) is not a result: it is
refused here, before the writer would clamp it into an all-black "completed" video.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from flowblend.errors import FlowblendError
from flowblend.runtime.video import save_video, to_frames

from .video_request import FPS

VIDEO, THUMBNAIL = "video.mp4", "thumbnail.png"


class NonFiniteVideo(FlowblendError):
    """The sampler produced NaN or Inf: the job fails with this reason."""


def write_results(video: torch.Tensor, folder: Path) -> tuple[str, str]:
    """(video file name, thumbnail file name) written into the job's folder, which must still exist."""
    if not bool(torch.isfinite(video).all()):
        raise NonFiniteVideo("the sampler produced non-finite values (NaN or Inf), so there is no video: lower "
                             "guidance or change the plan")
    if not folder.is_dir():
        raise FileNotFoundError(2, "the job's folder was removed while it ran")
    written = save_video(video, folder / VIDEO, fps=FPS)
    import imageio.v3 as iio

    tmp = folder / f".{THUMBNAIL}.partial"
    try:
        iio.imwrite(tmp, to_frames(video)[0], extension=".png")
        os.replace(tmp, folder / THUMBNAIL)
    finally:
        tmp.unlink(missing_ok=True)
    return written.name, THUMBNAIL
