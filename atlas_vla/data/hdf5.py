"""Raw LIBERO HDF5 (`<task>_demo.hdf5`) -> a LeRobot v2 folder that `load_libero` reads like the Hub version.

Each file holds the demonstrations of one task; the instruction lives in the `problem_info`
attribute. Images are stored upside down in the raw files (OpenGL convention) and are rotated by
180 degrees to the Hub convention unless asked not to. Optional no-op filtering drops the idle steps
OpenVLA's re-rendering drops: ||a[:6]|| < 1e-4 with the gripper command unchanged since the previous
kept step. The 8-D state is [ee_pos (3), ee_ori (3, axis-angle), gripper_states (2)].
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from atlas_vla.action_layout import ACTION_DIM, GRIPPER, POSE
from atlas_vla.data.lerobot_writer import LeRobotV2Writer
from atlas_vla.data.transforms import rotate_180

NOOP_THRESHOLD = 1e-4
_DEMO = re.compile(r"^demo_(\d+)$")
# key -> (trailing shape, or None for images (H, W, 3))
_KEYS = {"actions": (ACTION_DIM,), "obs/agentview_rgb": None, "obs/eye_in_hand_rgb": None, "obs/ee_pos": (3,),
         "obs/ee_ori": (3,), "obs/gripper_states": (2,)}


def find_hdf5_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The HDF5 files named by `inputs` (files, or folders searched for `*.hdf5`), sorted, de-duplicated."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*_demo.hdf5")) or sorted(path.glob("*.hdf5"))
            if not found:
                raise FileNotFoundError(f"no *.hdf5 files in {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"LIBERO HDF5 file or folder not found: {path}")
    return sorted(set(files))


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path}: not a readable HDF5 file ({error})") from error


def instruction_of(handle: h5py.File, path: Path) -> str:
    """The task's natural-language instruction, from the `problem_info` attribute of `data`."""
    if "data" not in handle:
        raise ValueError(f"{path}: no 'data' group; expected a LIBERO demo file")
    raw = handle["data"].attrs.get("problem_info")
    if raw is None:
        raise ValueError(f"{path}: data has no 'problem_info' attribute (it carries the instruction)")
    try:
        info = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        return str(info["language_instruction"]).strip()
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: data.attrs['problem_info'] has no language_instruction ({error})") from error


def noop_mask(actions: np.ndarray) -> np.ndarray:
    """True for the steps to keep: not (||a[:6]|| < 1e-4 and gripper unchanged since the last kept step)."""
    keep = np.ones(len(actions), dtype=bool)
    previous_gripper = None
    for t, action in enumerate(actions):
        idle = np.linalg.norm(action[POSE]) < NOOP_THRESHOLD
        if idle and (previous_gripper is None or action[GRIPPER] == previous_gripper):
            keep[t] = False
            continue
        previous_gripper = action[GRIPPER]
    return keep


def _read_demo(handle: h5py.File, path: Path, demo: str) -> dict[str, np.ndarray]:
    group = handle["data"][demo]
    arrays = {}
    for key, trailing in _KEYS.items():
        if key not in group:
            raise ValueError(f"{path}: data/{demo} has no '{key}'")
        array = group[key][()]
        expected = (3,) if trailing is None else trailing
        if array.ndim != (4 if trailing is None else 2) or array.shape[-len(expected):] != expected:
            want = "(T, H, W, 3)" if trailing is None else f"(T, {trailing[0]})"
            raise ValueError(f"{path}: data/{demo}/{key} has shape {array.shape}, expected {want}")
        if trailing is not None and not np.isfinite(array).all():
            raise ValueError(f"{path}: data/{demo}/{key} contains NaN or inf")
        arrays[key] = array
    lengths = {key: len(a) for key, a in arrays.items()}
    if len(set(lengths.values())) != 1 or not lengths["actions"]:
        raise ValueError(f"{path}: data/{demo} keys have different or zero lengths: {lengths}")
    return arrays


def _demos(handle: h5py.File) -> list[str]:
    names = [name for name in handle["data"].keys() if _DEMO.match(name)]
    return sorted(names, key=lambda name: int(_DEMO.match(name).group(1)))


def _frames(images: np.ndarray, rotate: bool, size: int | None) -> np.ndarray:
    images = np.stack([rotate_180(frame) for frame in images]) if rotate else images
    if size is not None and images.shape[1:3] != (size, size):
        images = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in images])
    return np.ascontiguousarray(images, dtype=np.uint8)


def iter_demos(path: Path) -> Iterator[tuple[int, str, dict[str, np.ndarray]]]:
    """(demo number, instruction, arrays) of every demo of one file, in demo order: the arrays of `_KEYS` as
    recorded (images upside down) and, where the file has them, the simulator `states` (T, D) it was recorded in."""
    with _open(path) as handle:
        instruction = instruction_of(handle, path)
        for demo in _demos(handle):
            arrays = _read_demo(handle, path, demo)
            if "states" in handle["data"][demo]:
                arrays["states"] = handle["data"][demo]["states"][()]
            yield int(_DEMO.match(demo).group(1)), instruction, arrays


def iter_episodes(files: Sequence[Path], *, rotate: bool = True, image_size: int | None = None,
                  filter_noops: bool = False) -> Iterator[tuple[dict[str, np.ndarray], str]]:
    """(episode arrays, instruction) for every demo of every file, in file then demo order."""
    for path in files:
        with _open(path) as handle:
            instruction = instruction_of(handle, path)
            for demo in _demos(handle):
                arrays = _read_demo(handle, path, demo)
                keep = noop_mask(arrays["actions"]) if filter_noops else np.ones(len(arrays["actions"]), bool)
                if not keep.any():
                    continue
                state = np.concatenate([arrays["obs/ee_pos"], arrays["obs/ee_ori"], arrays["obs/gripper_states"]], 1)
                yield {
                    "images": _frames(arrays["obs/agentview_rgb"][keep], rotate, image_size),
                    "wrist_images": _frames(arrays["obs/eye_in_hand_rgb"][keep], rotate, image_size),
                    "states": state[keep].astype(np.float32),
                    "actions": arrays["actions"][keep].astype(np.float32),
                }, instruction


def convert_libero_hdf5(inputs: Sequence[str | Path], output: str | Path, *, rotate: bool = True,
                        image_size: int | None = None, filter_noops: bool = False, fps: int = 20,
                        overwrite: bool = False) -> Path:
    """Convert raw LIBERO HDF5 files to a LeRobot v2 folder at `output` (the layout of
    physical-intelligence/libero); `sources.convert_libero_hdf5_to_dataset` writes a `save_to_disk` folder instead.

    Every file is checked before anything is written; the output appears only when complete.
    """
    files = find_hdf5_files(inputs)
    output = Path(output).expanduser()
    if output.exists() and not overwrite:
        raise ValueError(f"output folder already exists: {output} (pass --overwrite to replace it)")
    total = 0
    for path in files:
        with _open(path) as handle:
            instruction_of(handle, path)
            total += len(_demos(handle))
    writer = LeRobotV2Writer(output, fps=fps, overwrite=overwrite)
    try:
        episodes = iter_episodes(files, rotate=rotate, image_size=image_size, filter_noops=filter_noops)
        for arrays, instruction in tqdm(episodes, total=total, desc="converting demos", unit="demo"):
            writer.add_episode(arrays["images"], arrays["wrist_images"], arrays["states"], arrays["actions"],
                               instruction)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return output
