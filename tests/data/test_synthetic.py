"""The synthetic demo dataset: LeRobot v2 layout, deterministic, atomic, and learnable from images + instruction."""

from __future__ import annotations

import json

import numpy as np
import pytest

from atlas_vla.cli import main as cli
from atlas_vla.constants import ACTION, AGENT_IMAGE, INSTRUCTION, STATE, WRIST_IMAGE
from atlas_vla.data.sources import describe, load_libero
from atlas_vla.data.synthetic import INSTRUCTIONS, make_synthetic_libero


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return make_synthetic_libero(tmp_path_factory.mktemp("synth") / "data", num_episodes=40, seed=0)


def test_layout_and_contents(synthetic_dir):
    info = describe(str(synthetic_dir))
    assert info["layout"] == "lerobot-v2" and info["num_episodes"] == 40
    assert info["tasks"] == list(INSTRUCTIONS)
    assert (info["state_dim"], info["action_dim"]) == (8, 7)
    meta = json.loads((synthetic_dir / "meta" / "info.json").read_text())
    assert meta["total_frames"] == info["num_frames"] and meta["fps"] == 20
    ds = load_libero(str(synthetic_dir))
    row = ds[0]
    assert row[AGENT_IMAGE].size == (96, 96) and row[WRIST_IMAGE].size == (96, 96)
    actions = np.asarray(ds.with_format("numpy")[ACTION])
    assert set(np.unique(actions[:, 6])) == {-1.0, 1.0}  # gripper exactly open/close
    assert np.abs(actions[:, :2]).max() <= 1.0


def test_deterministic_and_refuses_overwrite(tmp_path, synthetic_dir):
    again = make_synthetic_libero(tmp_path / "again", num_episodes=40, seed=0)
    a = load_libero(str(synthetic_dir)).with_format("numpy")
    b = load_libero(str(again)).with_format("numpy")
    np.testing.assert_array_equal(a[ACTION], b[ACTION])
    np.testing.assert_array_equal(np.asarray(a[0][AGENT_IMAGE]), np.asarray(b[0][AGENT_IMAGE]))
    with pytest.raises(ValueError, match="already exists"):
        make_synthetic_libero(again, num_episodes=2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_learnable_from_image_and_instruction(synthetic_dir):
    """Block positions read off the image, with the instruction choosing the block, predict the actions
    far better than the mean action; without the instruction they cannot: the instruction matters."""
    ds = load_libero(str(synthetic_dir))
    images = np.stack([np.asarray(img, dtype=np.float32) for img in ds[AGENT_IMAGE]])  # (N, H, W, 3)
    ys, xs = np.mgrid[0 : images.shape[1], 0 : images.shape[2]] / images.shape[1]

    def centroid(mask: np.ndarray) -> np.ndarray:  # (N, H, W) -> (N, 2) as (x, y)
        total = mask.sum((1, 2))
        return np.stack([(mask * xs).sum((1, 2)) / total, (mask * ys).sum((1, 2)) / total], axis=1)

    red = centroid((images[..., 0] > 180) & (images[..., 2] < 100))
    blue = centroid((images[..., 2] > 180) & (images[..., 0] < 100))
    effector = np.asarray(ds[STATE])[:, :2]
    task = np.array([[float(t == INSTRUCTIONS[0])] for t in ds[INSTRUCTION]])
    target = np.asarray(ds[ACTION])[:, :2]
    episodes = np.asarray(ds["episode_index"])
    train, test = episodes < 30, episodes >= 30

    def error(features: np.ndarray) -> float:
        x = np.concatenate([features, np.ones((len(features), 1))], axis=1)
        w, *_ = np.linalg.lstsq(x[train], target[train], rcond=None)
        return float(np.abs(np.clip(x[test] @ w, -1, 1) - target[test]).mean())

    baseline = float(np.abs(target[test] - target[train].mean(0)).mean())
    named = task * red + (1 - task) * blue
    with_instruction = error(named - effector)
    without_instruction = error(np.concatenate([red - effector, blue - effector], axis=1))
    assert with_instruction < 0.5 * baseline
    assert with_instruction < 0.6 * without_instruction


def test_command(tmp_path, capsys):
    assert cli(["make-synthetic-libero", str(tmp_path / "d"), "--episodes", "4", "--image-size", "48"]) == 0
    assert load_libero(str(tmp_path / "d"))[0][AGENT_IMAGE].size == (48, 48)
    assert cli(["make-synthetic-libero", str(tmp_path / "d"), "--episodes", "4"]) == 2
    assert "already exists" in capsys.readouterr().err
