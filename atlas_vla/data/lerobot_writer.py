"""LeRobotV2Writer: write episodes as a LeRobot v2.0 folder, the layout of `physical-intelligence/libero`.

Used by the synthetic dataset and the raw-HDF5 converter, so everything atlas-vla writes loads
through `load_libero` exactly like the Hub dataset. Episodes go into a `StagedFolder` beside the
target, which is moved into place only when `close()` has written the metadata: an interrupted run
never leaves a folder that looks finished.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from atlas_vla.action_layout import ACTION_DIM
from atlas_vla.constants import OBJECT_POSITIONS, STATE_DIM
from atlas_vla.files import StagedFolder

CODEBASE_VERSION = "v2.0"
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
CHUNK_SIZE = 1000


IMAGE_FORMATS = ("png", "jpeg")
POSITIONS_FEATURE = datasets.Sequence(datasets.Value("float32"), length=6)  # how OBJECT_POSITIONS is stored


def _encoded(image: np.ndarray, image_format: str) -> dict:
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    else:
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return {"bytes": buffer.getvalue(), "path": None}


class LeRobotV2Writer:
    """Collects episodes (upright HWC uint8 frames, 8-D states, 7-D actions) into a LeRobot v2 folder."""

    def __init__(self, output: str | Path, *, fps: int, overwrite: bool = False, image_format: str = "png") -> None:
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        self.image_format = image_format
        self.output = Path(output).expanduser()
        if self.output.exists() and not overwrite:
            raise ValueError(f"output folder already exists: {self.output} (pass overwrite to replace it)")
        self._staged = StagedFolder(self.output)
        self.tmp = self._staged.path
        self.fps = fps
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict] = []
        self.num_frames = 0
        self.image_shape: tuple[int, ...] | None = None
        self.with_positions: bool | None = None  # whether the episodes carry OBJECT_POSITIONS (the first one decides)

    def add_episode(self, images: np.ndarray, wrist_images: np.ndarray, states: np.ndarray, actions: np.ndarray,
                    instruction: str, metadata: dict | None = None, object_positions: np.ndarray | None = None) -> None:
        """Append one episode: images (T, H, W, 3) uint8 upright, states (T, 8), actions (T, 7); `metadata` joins its
        row of `meta/episodes.jsonl` (e.g. a generated episode's layout); `object_positions` (T, 6), NaN where unknown,
        becomes the `OBJECT_POSITIONS` column (every episode of a folder has it, or none)."""
        T = len(actions)
        if object_positions is not None and np.shape(object_positions) != (T, 6):
            raise ValueError(f"object_positions must be (T, 6) = ({T}, 6), got {np.shape(object_positions)}")
        if self.with_positions is not None and self.with_positions != (object_positions is not None):
            raise ValueError(f"episode {len(self.episodes)}: object_positions "
                             f"{'missing' if self.with_positions else 'given'}; the episodes before it "
                             f"{'had' if self.with_positions else 'had none'}: a folder's episodes all carry them "
                             f"or none")
        self.with_positions = object_positions is not None
        shapes = {"images": images.shape, "wrist_images": wrist_images.shape, "states": states.shape,
                  "actions": actions.shape}
        if (images.ndim != 4 or images.shape[-1] != 3 or wrist_images.shape != images.shape
                or states.shape != (T, STATE_DIM) or actions.shape != (T, ACTION_DIM) or len(images) != T or T == 0):
            raise ValueError(f"episode arrays must be images/wrist_images (T, H, W, 3), states (T, {STATE_DIM}), "
                             f"actions (T, {ACTION_DIM}) with T > 0; got {shapes}")
        self.image_shape = self.image_shape or tuple(images.shape[1:])
        task_index = self.tasks.setdefault(instruction, len(self.tasks))
        episode_index = len(self.episodes)
        table = {
            "image": [_encoded(frame, self.image_format) for frame in images],
            "wrist_image": [_encoded(frame, self.image_format) for frame in wrist_images],
            "state": states.astype(np.float32).tolist(),
            "actions": actions.astype(np.float32).tolist(),
            "timestamp": (np.arange(T, dtype=np.float32) / self.fps).tolist(),
            "frame_index": list(range(T)),
            "episode_index": [episode_index] * T,
            "index": list(range(self.num_frames, self.num_frames + T)),
            "task_index": [task_index] * T,
            **({OBJECT_POSITIONS: np.asarray(object_positions, np.float32).tolist()} if self.with_positions else {}),
        }
        features = datasets.Features({
            "image": datasets.Image(), "wrist_image": datasets.Image(),
            "state": datasets.Sequence(datasets.Value("float32"), length=STATE_DIM),
            "actions": datasets.Sequence(datasets.Value("float32"), length=ACTION_DIM),
            "timestamp": datasets.Value("float32"), "frame_index": datasets.Value("int64"),
            "episode_index": datasets.Value("int64"), "index": datasets.Value("int64"),
            "task_index": datasets.Value("int64"),
            **({OBJECT_POSITIONS: POSITIONS_FEATURE} if self.with_positions else {}),
        })
        path = self.tmp / DATA_PATH.format(episode_chunk=episode_index // CHUNK_SIZE, episode_index=episode_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The Arrow schema carries the `datasets` features, so image columns decode as images on load.
        pq.write_table(datasets.Dataset.from_dict(table, features=features).data.table, path)
        self.episodes.append({"episode_index": episode_index, "tasks": [instruction], "length": T, **(metadata or {})})
        self.num_frames += T

    def close(self) -> Path:
        """Write the metadata and move the finished folder into place."""
        if not self.episodes:
            raise ValueError(f"no episodes were written to {self.output}")
        meta = self.tmp / "meta"
        meta.mkdir()
        image = {"dtype": "image", "shape": list(self.image_shape or ()), "names": ["height", "width", "channel"]}
        info = {
            "codebase_version": CODEBASE_VERSION, "robot_type": "panda",
            "total_episodes": len(self.episodes), "total_frames": self.num_frames, "total_tasks": len(self.tasks),
            "total_videos": 0, "total_chunks": (len(self.episodes) - 1) // CHUNK_SIZE + 1, "chunks_size": CHUNK_SIZE,
            "fps": self.fps, "splits": {"train": f"0:{len(self.episodes)}"}, "data_path": DATA_PATH,
            "features": {
                "image": image, "wrist_image": image,
                "state": {"dtype": "float32", "shape": [STATE_DIM], "names": ["state"]},
                "actions": {"dtype": "float32", "shape": [ACTION_DIM], "names": ["actions"]},
                **{name: {"dtype": dtype, "shape": [1], "names": None} for name, dtype in
                   (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                    ("index", "int64"), ("task_index", "int64"))},
                **({OBJECT_POSITIONS: {"dtype": "float32", "shape": [6], "names": [
                    "goal_x", "goal_y", "goal_z", "target_x", "target_y", "target_z"]}} if self.with_positions else {}),
            },
        }
        (meta / "info.json").write_text(json.dumps(info, indent=4))
        _write_jsonl(meta / "tasks.jsonl", [{"task_index": i, "task": t} for t, i in self.tasks.items()])
        _write_jsonl(meta / "episodes.jsonl", self.episodes)
        return self._staged.commit()

    def abort(self) -> None:
        """Remove the temporary folder (after an error)."""
        self._staged.abort()


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
