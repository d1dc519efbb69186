"""Small transforms shared by training and inference.

Every image the policy sees, whether it comes out of a parquet file during training
(`atlas_vla.data.samples`) or out of the simulator at evaluation time (`observation_to_sample`),
goes through `image_to_chw`: one decoder and one resize (`resize_images`). Keeping one code path is
what makes the pixels at inference match the pixels at training time.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from atlas_vla.constants import (
    INSTRUCTION,
    OBS_IMAGES,
    OBS_STATE,
    OBSERVATION_KEYS,
    STATE_DIM,
)
from atlas_vla.data.spec import SampleSpec

# Anything a LIBERO image can arrive as: encoded bytes, the parquet `{bytes, path}` struct, a PIL
# image, or an (H, W, 3) uint8 array.
ImageLike = Union[bytes, Mapping[str, Any], Image.Image, np.ndarray]


def open_image(image: ImageLike, size: int | None = None) -> Image.Image:
    """Open any `ImageLike` as an RGB PIL image.

    With `size`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still covers
    `size` x `size` (`Image.draft`), which skips most of the decoding work for large frames; the
    final resize is `resize_images` either way.
    """
    if isinstance(image, Mapping):  # the Arrow struct of `datasets.Image`: embedded bytes, else a file path
        path = image.get("path")
        if image.get("bytes") is None and not (path and os.path.isfile(path)):
            raise ValueError(f"image struct has no encoded bytes and no readable file (path={path!r}); expected {{bytes, path}}")
        image = image["bytes"] if image.get("bytes") is not None else Path(path).read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            pil = Image.open(io.BytesIO(image))
            if size is not None and pil.format == "JPEG":
                pil.draft("RGB", (size, size))
            pil.load()
        except Exception as error:  # PIL raises several types for corrupt data
            raise ValueError(f"could not decode image bytes ({len(image)} bytes): {error}") from error
        image = pil
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an image array of shape (H, W, 3), got {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image array, got dtype {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected image bytes, a {{bytes, path}} struct, a PIL image or an array, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 images (N, 3, h, w) to uint8 (N, 3, size, size): the only resize in the project.

    Bilinear with antialiasing, computed by torch directly on uint8 (its fast path for
    channels-last input; within one grey level of PIL's bilinear filter). Non-square inputs are
    stretched to a square, as LIBERO cameras are square already.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def random_shift(images: np.ndarray, pad: int) -> np.ndarray:
    """DrQ-style random shift: every uint8 image (..., 3, H, W) is padded by `pad` edge pixels on
    each side and cropped back to H x W at its own random offset (up to `pad` pixels each way).

    Offsets come from torch's RNG, which `DataLoader` seeds differently in every worker and epoch."""
    if pad <= 0:
        return images
    C, H, W = images.shape[-3:]
    flat = images.reshape(-1, C, H, W)
    padded = np.pad(flat, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="edge")
    offsets = torch.randint(0, 2 * pad + 1, (len(flat), 2)).tolist()
    shifted = np.stack([padded[i, :, dy:dy + H, dx:dx + W] for i, (dy, dx) in enumerate(offsets)])
    return shifted.reshape(images.shape)


def shift_cameras(views: np.ndarray, shift: int | Sequence[int], num_cameras: int) -> np.ndarray:
    """`random_shift` of views (..., S, 3, H, W) whose S run over the cameras in `CAMERAS` order at each time step:
    every view by `shift` pixels, or the views of camera `c` by `shift[c]` (`[0, 4]`: the wrist camera alone, while
    the agent view, whose camera never moves, stays as the camera saw it)."""
    if not isinstance(shift, (list, tuple)):
        return random_shift(views, shift)
    shifted = views.copy()
    for camera in range(num_cameras):
        shifted[..., camera::num_cameras, :, :, :] = random_shift(views[..., camera::num_cameras, :, :, :],
                                                                  shift[camera])
    return shifted


def image_to_chw(image: ImageLike, size: int) -> np.ndarray:
    """Decode any `ImageLike` and resize it with `resize_images` to uint8 (3, size, size)."""
    hwc = np.array(open_image(image, size))  # (H, W, 3), a writable copy
    chw = torch.from_numpy(hwc).permute(2, 0, 1)[None]  # (1, 3, H, W), channels-last in memory
    return resize_images(chw, size)[0].contiguous().numpy()


def camera_views(images: Sequence[ImageLike], size: int) -> np.ndarray:
    """Stack views (in the order given) as uint8 (V, 3, size, size)."""
    return np.stack([image_to_chw(image, size) for image in images])


def state_vector(state: Any) -> np.ndarray:
    """Check and convert the 8-D LIBERO state (eef pos, eef axis-angle, gripper qpos) to float32."""
    array = np.asarray(state, dtype=np.float32)
    if array.shape != (STATE_DIM,):
        raise ValueError(f"expected a state of shape ({STATE_DIM},), got {array.shape}")
    return array


def rotate_180(image: np.ndarray) -> np.ndarray:
    """Rotate a raw simulator frame (H, W, C) by 180 degrees into the upright Hub convention.

    LIBERO renders with the OpenGL convention (upside down); every Hub dataset and the policy use
    the rotated, upright frame. The result is a contiguous copy.
    """
    if not isinstance(image, np.ndarray) or image.ndim < 2:
        raise ValueError(f"expected an image array (H, W[, C]), got {getattr(image, 'shape', type(image).__name__)}")
    return np.ascontiguousarray(image[::-1, ::-1])


def quat_to_axis_angle(quat: Any) -> np.ndarray:
    """Convert robosuite quaternions (..., 4) in (x, y, z, w) order to axis-angle vectors (..., 3).

    The rotation angle is 2 * acos(w) and the axis is (x, y, z) / sqrt(1 - w^2); a (near) identity
    rotation maps to the zero vector. Same convention as robosuite's `quat2axisangle`, vectorised.
    """
    q = np.asarray(quat, dtype=np.float64)
    if q.shape[-1:] != (4,):
        raise ValueError(f"expected quaternions of shape (..., 4) in (x, y, z, w) order, got {q.shape}")
    w = np.clip(q[..., 3], -1.0, 1.0)
    sin_half = np.sqrt(1.0 - w * w)
    scale = np.divide(2.0 * np.arccos(w), sin_half, out=np.zeros_like(w), where=sin_half > 1e-10)
    return q[..., :3] * scale[..., None]


def libero_state(eef_pos: Any, eef_quat: Any, gripper_qpos: Any) -> np.ndarray:
    """The 8-D LIBERO state `[eef_pos(3), axis-angle(eef_quat)(3), gripper_qpos(2)]` as float32 (..., 8).

    Used by the HDF5 converter and by the simulator so both build the state the Hub datasets hold.
    """
    pos = np.asarray(eef_pos, dtype=np.float64)
    gripper = np.asarray(gripper_qpos, dtype=np.float64)
    if pos.shape[-1:] != (3,) or gripper.shape[-1:] != (2,):
        raise ValueError(f"expected eef_pos (..., 3) and gripper_qpos (..., 2), got {pos.shape} and {gripper.shape}")
    return np.concatenate([pos, quat_to_axis_angle(eef_quat), gripper], axis=-1).astype(np.float32)


def observation_to_sample(observation: Mapping[str, Any], spec: SampleSpec) -> dict[str, Any]:
    """Turn one upright observation into the batch keys of one time step.

    `observation` has the keys of `constants.OBSERVATION_KEYS` (`agentview_image`, `wrist_image` as
    upright (H, W, 3) uint8, `state` (8,), `task_description`). Returns `OBS_IMAGES` uint8
    (num_cameras, 3, H, W) in the order [agentview, wrist], `OBS_STATE` float32 (8,) and
    `INSTRUCTION` str, built with the same functions as the training samples.
    """
    needed = OBSERVATION_KEYS if spec.use_wrist_camera else tuple(k for k in OBSERVATION_KEYS if k != "wrist_image")
    missing = [key for key in needed if key not in observation]
    if missing:
        raise ValueError(f"observation is missing {missing}; expected keys {list(needed)}, found {sorted(observation)}")
    cameras = [observation["agentview_image"]] + ([observation["wrist_image"]] if spec.use_wrist_camera else [])
    for name, image in zip(("agentview_image", "wrist_image"), cameras):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            shape = getattr(image, "shape", type(image).__name__)
            raise ValueError(f"observation[{name!r}] must be an upright (H, W, 3) uint8 array, got {shape}")
    instruction = observation["task_description"]
    instruction = instruction.item() if isinstance(instruction, np.ndarray) else instruction
    if not isinstance(instruction, str):
        raise ValueError(f"observation['task_description'] must be a string, got {type(instruction).__name__}")
    return {
        OBS_IMAGES: torch.from_numpy(camera_views(cameras, spec.image_size)),  # (num_cameras, 3, H, W)
        OBS_STATE: torch.from_numpy(state_vector(observation["state"])),
        INSTRUCTION: instruction,
    }
