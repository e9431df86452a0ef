"""Writing generated videos: uint8 frames, mp4 through imageio-ffmpeg (GIF where ffmpeg is absent).

Files are written to a temporary name beside the target and renamed into place, so a failed or
interrupted run never leaves a half-written video behind.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def to_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    if video.dim() == 5:
        video = video[0]
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def ffmpeg_available() -> bool:
    try:
        import imageio_ffmpeg

        return Path(imageio_ffmpeg.get_ffmpeg_exe()).exists()
    except Exception:  # noqa: BLE001 - any failure means "no ffmpeg"
        return False


def save_video(video, path: str | os.PathLike, fps: int = 8) -> Path:
    """Write a video atomically; a .mp4 path becomes .gif when ffmpeg is unavailable. Returns the path written."""
    import imageio.v3 as iio

    frames = video if isinstance(video, np.ndarray) else to_frames(video)
    path = Path(path)
    if path.suffix.lower() == ".mp4" and not ffmpeg_available():
        path = path.with_suffix(".gif")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        if path.suffix.lower() == ".gif":
            iio.imwrite(tmp, frames, extension=".gif", duration=1000 / fps, loop=0)
        else:
            # macro_block_size=1 keeps tiny sizes (32x32) as they are
            iio.imwrite(tmp, frames, extension=path.suffix, fps=fps, codec="libx264", macro_block_size=1,
                        output_params=["-crf", "12"])
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
