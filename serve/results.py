"""A finished job's files: the video and its first frame as a thumbnail, each written to a temporary name and renamed.

A video whose values are not finite (an update that overflowed: a huge guidance) is not a result: it is
refused here, before the writer would clamp it into an all-black "completed" video.
"""
from __future__ import annotations

from pathlib import Path

import torch

from flowblend.atomic import write_atomic
from flowblend.errors import FlowblendError

from ..runtime.video import save_video, to_frames
from .jobs import FILE_MODE
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

    first = to_frames(video)[0]
    write_atomic(folder / THUMBNAIL, lambda tmp: iio.imwrite(tmp, first, extension=".png"), mode=FILE_MODE,
                 parents=False)
    return written.name, THUMBNAIL
