"""The transforms shared by training and inference, checked by value on the real LIBERO fixtures."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from atlas_vla.constants import INSTRUCTION, OBS_IMAGES, OBS_STATE
from atlas_vla.config import TrainConfig
from atlas_vla.data.config import DataConfig, shifts_anything
from atlas_vla.models.config import PolicyConfig
from atlas_vla.data.samples import LiberoSamples
from atlas_vla.data.sources import load_libero
from atlas_vla.data.spec import SampleSpec
from atlas_vla.data.transforms import (
    image_to_chw,
    libero_state,
    observation_to_sample,
    quat_to_axis_angle,
    random_shift,
    resize_images,
    rotate_180,
    shift_cameras,
)


def _observation(path: Path) -> dict:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _gradient(height: int = 20, width: int = 30) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 8, y * 12, (x + y) * 4], axis=-1).astype(np.uint8)


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_image_to_chw_accepts_every_form_with_one_resize(tmp_path: Path) -> None:
    array = _gradient()
    expected = resize_images(torch.from_numpy(array).permute(2, 0, 1)[None], 16)[0].numpy()
    pil = np.asarray(Image.fromarray(array).resize((16, 16), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert np.abs(expected.astype(int) - pil).max() <= 1  # the same filter as PIL's bilinear
    png = _encoded(array, "PNG")
    file = tmp_path / "frame.png"
    file.write_bytes(png)
    for image in (array, Image.fromarray(array), png, {"bytes": png, "path": None}, {"bytes": None, "path": str(file)}):
        result = image_to_chw(image, 16)
        assert result.shape == (3, 16, 16) and result.dtype == np.uint8
        np.testing.assert_array_equal(result, expected)
    jpeg = image_to_chw(_encoded(array, "JPEG"), 16).astype(int)
    assert np.abs(jpeg - expected).mean() < 4  # lossy, same geometry
    # A large JPEG is decoded at a reduced DCT scale (draft) and still lands on the same picture.
    big = np.repeat(np.repeat(array, 8, axis=0), 8, axis=1)  # (160, 240, 3)
    drafted = image_to_chw(_encoded(big, "JPEG"), 16).astype(int)
    assert np.abs(drafted - image_to_chw(big, 16).astype(int)).mean() < 4
    rgba = Image.fromarray(array).convert("RGBA")
    np.testing.assert_array_equal(image_to_chw(rgba, 16), expected)
    square = _gradient(20, 20)
    np.testing.assert_array_equal(image_to_chw(square, 20), square.transpose(2, 0, 1))  # right size: untouched
    with pytest.raises(ValueError, match=r"uint8 images of shape \(N, 3, H, W\)"):
        resize_images(torch.zeros(1, 3, 8, 8), 4)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((16, 16), np.uint8), r"shape \(H, W, 3\), got \(16, 16\)"),
        (np.zeros((16, 16, 4), np.uint8), r"shape \(H, W, 3\), got \(16, 16, 4\)"),
        (np.zeros((16, 16, 3), np.float32), "uint8 image array, got dtype float32"),
        (b"\x89PNG broken", "could not decode image bytes"),
        ({"bytes": None, "path": "/no/such/frame.png"}, "no encoded bytes and no readable file"),
        ([1, 2, 3], "got list"),
    ],
)
def test_image_to_chw_rejects_bad_images(image, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        image_to_chw(image, 16)


def test_rotate_180() -> None:
    frame = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    rotated = rotate_180(frame)
    np.testing.assert_array_equal(rotated[0, 0], frame[1, 2])
    np.testing.assert_array_equal(rotated[1, 2], frame[0, 0])
    np.testing.assert_array_equal(rotate_180(rotated), frame)
    assert rotated.flags["C_CONTIGUOUS"]
    with pytest.raises(ValueError, match="expected an image array"):
        rotate_180(np.zeros(5))


def test_quat_to_axis_angle() -> None:
    s = np.sqrt(0.5)
    quats = np.array([[0, 0, 0, 1], [0, 0, s, s], [1, 0, 0, 0], [0, s, 0, -s]], dtype=np.float64)
    expected = [[0, 0, 0], [0, 0, np.pi / 2], [np.pi, 0, 0], [0, 3 * np.pi / 2, 0]]
    np.testing.assert_allclose(quat_to_axis_angle(quats), expected, atol=1e-12)
    np.testing.assert_allclose(quat_to_axis_angle(quats[1]), expected[1], atol=1e-12)
    with pytest.raises(ValueError, match=r"\(x, y, z, w\)"):
        quat_to_axis_angle([0, 0, 1])


def test_libero_state_round_trips_a_real_state(observation_file: Path) -> None:
    state = _observation(observation_file)["state"]
    axis_angle = state[3:6]
    angle = np.linalg.norm(axis_angle)
    quat = np.r_[axis_angle / angle * np.sin(angle / 2), np.cos(angle / 2)]  # (x, y, z, w)
    rebuilt = libero_state(state[:3], quat, state[6:])
    assert rebuilt.shape == (8,) and rebuilt.dtype == np.float32
    np.testing.assert_allclose(rebuilt, state, atol=1e-6)
    with pytest.raises(ValueError, match="gripper_qpos"):
        libero_state(state[:3], quat, state[6:7])


def test_observation_to_sample_on_the_real_observation(observation_file: Path, sim_demos_dir: Path) -> None:
    observation = _observation(observation_file)
    sample = observation_to_sample(observation, SampleSpec(image_size=224))
    assert sample[OBS_IMAGES].shape == (2, 3, 224, 224) and sample[OBS_IMAGES].dtype == torch.uint8
    assert sample[OBS_STATE].dtype == torch.float32
    assert sample[INSTRUCTION] == "pick up the black bowl between the plate and the ramekin and place it on the plate"
    np.testing.assert_array_equal(sample[OBS_IMAGES][0].numpy(), observation["agentview_image"].transpose(2, 0, 1))
    np.testing.assert_array_equal(sample[OBS_IMAGES][1].numpy(), observation["wrist_image"].transpose(2, 0, 1))

    # Frame 0 of sim_demos episode 0 is the same scene from the same initial state: same state
    # layout (to float32), and the training path's upright views match the observation's.
    raw = pq.read_table(sim_demos_dir / "data" / "chunk-000" / "episode_000000.parquet", columns=["state"])
    np.testing.assert_allclose(sample[OBS_STATE].numpy(), raw.column("state")[0].as_py(), atol=1e-6)
    spec = SampleSpec(image_size=224)
    training = LiberoSamples(load_libero(str(sim_demos_dir), max_episodes=1), spec)[0]
    assert training[OBS_IMAGES].shape == sample[OBS_IMAGES].shape
    for camera, key in enumerate(("agentview_image", "wrist_image")):
        trained_view = training[OBS_IMAGES][camera].numpy().astype(float)
        upright = np.abs(trained_view - sample[OBS_IMAGES][camera].numpy()).mean()
        flipped = np.abs(trained_view - image_to_chw(rotate_180(observation[key]), 224)).mean()
        assert upright < 10 < 40 < flipped, (key, upright, flipped)  # measured: ~4 vs ~70

    small = observation_to_sample(observation, SampleSpec(image_size=112, use_wrist_camera=False))
    assert small[OBS_IMAGES].shape == (1, 3, 112, 112)


def test_observation_to_sample_rejects_bad_observations(observation_file: Path) -> None:
    spec = SampleSpec()
    good = _observation(observation_file)
    with pytest.raises(ValueError, match=r"missing \['wrist_image'\]"):
        observation_to_sample({k: v for k, v in good.items() if k != "wrist_image"}, spec)
    observation_to_sample({k: v for k, v in good.items() if k != "wrist_image"}, SampleSpec(use_wrist_camera=False))
    with pytest.raises(ValueError, match=r"observation\['agentview_image'\] must be an upright \(H, W, 3\) uint8 array, got \(224, 224\)"):
        observation_to_sample({**good, "agentview_image": good["agentview_image"][..., 0]}, spec)
    with pytest.raises(ValueError, match=r"observation\['wrist_image'\].*got \(3, 224, 224\)"):
        observation_to_sample({**good, "wrist_image": good["wrist_image"].transpose(2, 0, 1)}, spec)
    with pytest.raises(ValueError, match=r"state of shape \(8,\), got \(7,\)"):
        observation_to_sample({**good, "state": good["state"][:7]}, spec)
    with pytest.raises(ValueError, match="task_description'] must be a string"):
        observation_to_sample({**good, "task_description": 3}, spec)


def test_random_shift_crops_the_edge_padded_image_at_independent_offsets() -> None:
    images = torch.randint(0, 256, (3, 2, 3, 16, 16), dtype=torch.uint8).numpy()  # (B, S, 3, H, W)
    assert random_shift(images, 0) is images
    torch.manual_seed(0)
    shifted = random_shift(images, 2)
    assert shifted.shape == images.shape and shifted.dtype == np.uint8
    padded = np.pad(images, ((0, 0), (0, 0), (0, 0), (2, 2), (2, 2)), mode="edge")
    offsets = set()
    for b in range(3):
        for s in range(2):
            matches = [(dy, dx) for dy in range(5) for dx in range(5)
                       if np.array_equal(shifted[b, s], padded[b, s, :, dy:dy + 16, dx:dx + 16])]
            assert len(matches) == 1  # a pure translation of this very view, edges replicated
            offsets.add(matches[0])
    assert len(offsets) > 1  # views are shifted independently


def test_a_shift_per_camera_leaves_the_agent_view_exact_and_shifts_the_wrist_view() -> None:
    """`data.random_shift: [0, 4]`: views run [agent view, wrist] per time step; the agent view's camera never moves,
    so only the wrist views are shifted. One number for every camera draws exactly what `random_shift` draws."""
    views = torch.randint(0, 256, (3, 4, 3, 16, 16), dtype=torch.uint8).numpy()  # (B, S = 2 frames x 2 cameras, ...)
    torch.manual_seed(0)
    shifted = shift_cameras(views, [0, 2], num_cameras=2)
    assert np.array_equal(shifted[:, 0::2], views[:, 0::2])  # agent view, both time steps: as the camera saw it
    padded = np.pad(views, ((0, 0), (0, 0), (0, 0), (2, 2), (2, 2)), mode="edge")
    offsets = {next((dy, dx) for dy in range(5) for dx in range(5)
                    if np.array_equal(shifted[b, s], padded[b, s, :, dy:dy + 16, dx:dx + 16]))
               for b in range(3) for s in (1, 3)}
    assert len(offsets) > 1 and offsets != {(2, 2)}  # the wrist views: translations at their own offsets
    torch.manual_seed(0)
    every = shift_cameras(views, 2, num_cameras=2)
    torch.manual_seed(0)
    assert np.array_equal(every, random_shift(views, 2))
    assert not np.array_equal(every[:, 0::2], views[:, 0::2])
    assert shifts_anything(2) and shifts_anything([0, 4]) and not shifts_anything([0, 0]) and not shifts_anything(0)
    with pytest.raises(ValueError, match=r"data.random_shift: \[0, 4\] shifts the wrist camera, and "
                                         r"model.use_wrist_camera is false: give the agent view's shift alone, e.g. 0"):
        TrainConfig(data=DataConfig(random_shift=[0, 4]), model=PolicyConfig(use_wrist_camera=False))
    for bad in ([4], [0, -1], [0, 4, 4], -2, [0.5, 4]):
        with pytest.raises(ValueError, match=r"DataConfig.random_shift must be a non-negative integer \(pixels\) or "
                                             r"one per camera \[agent view, wrist\]"):
            DataConfig(random_shift=bad)


def test_training_samples_shift_the_cameras_the_config_names(tmp_path) -> None:
    from helpers import synthetic_dataset

    from atlas_vla.data.samples import build_samples

    dataset = load_libero(str(synthetic_dataset(tmp_path, num_episodes=2)))
    spec = SampleSpec(image_size=28, action_horizon=2)
    exact = build_samples(dataset, spec)[5][OBS_IMAGES]  # (2 cameras, 3, H, W)
    wrist_only = build_samples(dataset, spec, DataConfig(random_shift=[0, 3]), train=True)
    torch.manual_seed(1)
    shifted = [wrist_only[5][OBS_IMAGES] for _ in range(4)]
    assert all(torch.equal(views[0], exact[0]) for views in shifted)  # the agent view as the camera saw it
    assert not all(torch.equal(views[1], exact[1]) for views in shifted)
    assert wrist_only.random_shift == [0, 3]
