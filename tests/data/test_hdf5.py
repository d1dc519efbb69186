"""Raw LIBERO HDF5 conversion: written in the exact LIBERO schema by the test, checked by value."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from atlas_vla.cli import main as cli
from atlas_vla.constants import ACTION, AGENT_IMAGE, INSTRUCTION, STATE, WRIST_IMAGE
from atlas_vla.data.hdf5 import convert_libero_hdf5, noop_mask
from atlas_vla.data.sources import convert_libero_hdf5_to_dataset, describe, load_libero

INSTRUCTION_TEXT = "put the bowl on the plate"


def write_libero_hdf5(path: Path, lengths=(6, 5), instruction=INSTRUCTION_TEXT, corrupt=None) -> Path:
    """A `<task>_demo.hdf5` with every attribute and dataset of the LIBERO schema."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_name"] = "Libero_Tabletop_Manipulation"
        data.attrs["problem_info"] = json.dumps({"problem_name": "libero_tabletop_manipulation",
                                                 "domain_name": "robosuite", "language_instruction": instruction})
        data.attrs["macros_image_convention"] = "opengl"
        data.attrs["bddl_file_name"] = "libero/bddl_files/libero_spatial/task.bddl"
        data.attrs["env_args"] = json.dumps({"type": 1, "env_name": "Libero_Tabletop_Manipulation", "env_kwargs": {}})
        data.attrs["num_demos"] = len(lengths)
        data.attrs["total"] = sum(lengths)
        for d, T in enumerate(lengths):
            g = data.create_group(f"demo_{d}")
            g.attrs["num_samples"] = T
            g.attrs["model_file"] = "<mujoco/>"
            g.attrs["init_state"] = rng.normal(size=10)
            actions = rng.uniform(-1, 1, size=(T, 7))
            actions[:, 6] = np.where(np.arange(T) < T // 2, -1.0, 1.0)
            if d == 0:
                actions[1, :6] = 0.0  # idle with the gripper unchanged: a no-op
                actions[T // 2, :6] = 0.0  # idle but the gripper closes: kept
            g["actions"] = actions
            g["states"] = rng.normal(size=(T, 20))
            g["robot_states"] = rng.normal(size=(T, 9))
            g["rewards"] = np.r_[np.zeros(T - 1), 1].astype(np.uint8)
            g["dones"] = np.r_[np.zeros(T - 1), 1].astype(np.uint8)
            obs = g.create_group("obs")
            agent = np.zeros((T, 16, 16, 3), np.uint8)
            agent[:, 0, 0] = 255  # raw top-left pixel: bottom-right once rotated upright
            agent[:, 0, 0, 1] = np.arange(T) * 10 + d  # frame and demo encoded in the green channel
            obs["agentview_rgb"] = agent
            obs["eye_in_hand_rgb"] = np.full((T, 16, 16, 3), 50 + d, np.uint8)
            obs["ee_pos"] = rng.normal(size=(T, 3))
            obs["ee_ori"] = rng.normal(size=(T, 3))
            obs["ee_states"] = np.concatenate([obs["ee_pos"][()], obs["ee_ori"][()]], 1)
            obs["gripper_states"] = rng.normal(size=(T, 2))
            obs["joint_states"] = rng.normal(size=(T, 7))
            if corrupt == "nan" and d == 1:
                del obs["ee_pos"]
                obs["ee_pos"] = np.full((T, 3), np.nan)
            if corrupt == "missing" and d == 1:
                del obs["gripper_states"]
            if corrupt == "shape" and d == 1:
                del g["actions"]
                g["actions"] = np.zeros((T, 6))
    return path


@pytest.fixture
def raw(tmp_path) -> Path:
    folder = tmp_path / "raw"
    folder.mkdir()
    write_libero_hdf5(folder / "a_task_demo.hdf5")
    write_libero_hdf5(folder / "b_task_demo.hdf5", lengths=(4,), instruction="open the drawer")
    return folder


@pytest.mark.parametrize("output_format", ["lerobot_v2", "saved_dataset"])
def test_converts_with_instruction_orientation_state(raw, tmp_path, output_format):
    convert = convert_libero_hdf5 if output_format == "lerobot_v2" else convert_libero_hdf5_to_dataset
    out = convert([raw], tmp_path / "out")
    ds = load_libero(str(out))
    assert len(ds) == 6 + 5 + 4
    assert ds[INSTRUCTION][:11] == [INSTRUCTION_TEXT] * 11 and ds[INSTRUCTION][11:] == ["open the drawer"] * 4
    with h5py.File(raw / "a_task_demo.hdf5") as f:
        demo = f["data/demo_1"]
        expected_state = np.concatenate([demo["obs/ee_pos"][2], demo["obs/ee_ori"][2], demo["obs/gripper_states"][2]])
        expected_action = demo["actions"][2]
    row = ds[6 + 2]  # demo_1, frame 2
    np.testing.assert_allclose(row[STATE], expected_state, rtol=1e-6)
    np.testing.assert_allclose(row[ACTION], expected_action, rtol=1e-6)
    image = np.asarray(row[AGENT_IMAGE])
    assert image[-1, -1, 0] == 255 and image[0, 0, 0] == 0  # rotated 180 degrees
    assert image[-1, -1, 1] == 2 * 10 + 1
    assert np.asarray(row[WRIST_IMAGE])[0, 0, 0] == 51
    if output_format == "lerobot_v2":
        info = describe(str(out))
        assert info["num_episodes"] == 3 and info["fps"] == 20 and info["tasks"] == [INSTRUCTION_TEXT, "open the drawer"]


def test_no_rotate_resize_and_noop_filter(raw, tmp_path):
    out = convert_libero_hdf5([raw / "a_task_demo.hdf5"], tmp_path / "out", rotate=False, image_size=8,
                              filter_noops=True)
    ds = load_libero(str(out))
    assert len(ds) == 6 - 1 + 5  # one no-op dropped; the idle step that closes the gripper is kept
    image = np.asarray(ds[0][AGENT_IMAGE])
    assert image.shape == (8, 8, 3) and image[0, 0, 0] > 0  # not rotated: top-left stays top-left


def test_noop_mask_by_value():
    actions = np.array([[0, 0, 0, 0, 0, 0, -1], [0.5, 0, 0, 0, 0, 0, -1], [0, 0, 0, 0, 0, 0, -1],
                        [0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 1]], dtype=float)
    assert noop_mask(actions).tolist() == [False, True, False, True, False]


@pytest.mark.parametrize("corrupt,message", [
    ("nan", r"b_demo.hdf5: data/demo_1/obs/ee_pos contains NaN"),
    ("missing", r"b_demo.hdf5: data/demo_1 has no 'obs/gripper_states'"),
    ("shape", r"b_demo.hdf5: data/demo_1/actions has shape \(5, 6\), expected \(T, 7\)"),
])
@pytest.mark.parametrize("convert", [convert_libero_hdf5, convert_libero_hdf5_to_dataset])
def test_bad_files_are_named_and_leave_no_output(tmp_path, corrupt, message, convert):
    path = write_libero_hdf5(tmp_path / "b_demo.hdf5", corrupt=corrupt)
    with pytest.raises(ValueError, match=message):
        convert([path], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b_demo.hdf5"]  # nothing half-written


def test_command_and_errors(raw, tmp_path, capsys):
    assert cli(["convert-libero-hdf5", str(raw), "--output", str(tmp_path / "o"), "--format", "saved_dataset"]) == 0
    assert len(load_libero(str(tmp_path / "o"))) == 15
    assert cli(["convert-libero-hdf5", str(raw), "--output", str(tmp_path / "o")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli(["convert-libero-hdf5", str(tmp_path / "none"), "--output", str(tmp_path / "p")]) == 2
    assert f"LIBERO HDF5 file or folder not found: {tmp_path / 'none'}" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    (tmp_path / "bad.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="bad.hdf5: not a readable HDF5 file"):
        convert_libero_hdf5([tmp_path / "bad.hdf5"], tmp_path / "q")


def test_raw_hdf5_files_are_a_source_converted_once(tmp_path):
    from atlas_vla.data.config import DataConfig
    from atlas_vla.data.split import load_train_val

    raw = tmp_path / "raw"
    raw.mkdir()
    write_libero_hdf5(raw / "bowl_demo.hdf5")
    cache = str(tmp_path / "cache")
    direct = load_libero(str(raw), cache_dir=cache)
    converted = load_libero(str(convert_libero_hdf5([raw], tmp_path / "converted")))
    assert direct.to_dict() == converted.to_dict()  # the converter's defaults: upright images, every step
    [folder] = (tmp_path / "cache" / "atlas_vla_hdf5").iterdir()
    stamp = folder.stat().st_mtime_ns
    assert load_libero(str(raw / "bowl_demo.hdf5"), cache_dir=cache).num_rows == direct.num_rows
    assert describe(str(raw), cache_dir=cache)["source"] == str(raw)
    assert folder.stat().st_mtime_ns == stamp and len(list(folder.parent.iterdir())) == 1  # the same files: one conversion
    # a raw HDF5 source mixes with a LeRobot one
    train, _ = load_train_val(DataConfig(source=[str(tmp_path / "converted"), str(raw)], val_fraction=0.0,
                                         cache_dir=cache))
    assert train.num_rows == 2 * direct.num_rows
