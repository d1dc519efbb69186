"""Writing episode videos (mp4 through imageio-ffmpeg): simulator rollouts and validation episodes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from atlas_vla.files import staged_file


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 10) -> Path:
    """Write (T, H, W, 3) uint8 frames to `path` (written beside, then renamed)."""
    try:
        import imageio.v2 as imageio
    except ImportError as error:
        raise ValueError("writing videos needs imageio and imageio-ffmpeg: pip install -e '.[wandb]'") from error
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"video frames must be a non-empty (T, H, W, 3) uint8 array, got {frames.shape} {frames.dtype}")
    with staged_file(path) as tmp:
        # macro_block_size=1 keeps odd frame sizes as they are instead of resizing them
        with imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=1, format="FFMPEG") as writer:
            for frame in frames:
                writer.append_data(frame)
    return Path(path)
