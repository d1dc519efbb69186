"""Loading LIBERO sources, the episode split and the training samples, checked by value.

The test datasets are written here in the real on-disk formats (LeRobot v2 with `datasets`
metadata, LeRobot v3 written by pyarrow/pandas without it). Every frame encodes where it came
from: images are solid colours (R = 10 * episode, G = frame, B = camera), state[:2] and
action[:2] are (episode, frame), so a wrong row, camera, chunk step or context frame shows up as a
wrong number.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from atlas_vla.cli import main
from atlas_vla.constants import (
    ACTION,
    ACTIONS,
    ACTIONS_PAD_MASK,
    AGENT_IMAGE,
    CANONICAL_COLUMNS,
    EPISODE_INDEX,
    FRAME_INDEX,
    INSTRUCTION,
    OBS_IMAGES,
    OBS_STATE,
    STATE,
    TASK_INDEX,
    WRIST_IMAGE,
)
from atlas_vla.data.config import DataConfig
from atlas_vla.data.samples import LiberoSamples, LiberoSampleStream, collate
from atlas_vla.data.sources import (
    LAYOUT_LEROBOT_V2,
    LAYOUT_LEROBOT_V3,
    LAYOUT_SAVED,
    describe,
    detect_layout,
    load_libero,
)
from atlas_vla.data.spec import SampleSpec
from atlas_vla.data.split import load_train_val, split_episodes

TASKS = ["put the bowl on the plate", "open the top drawer"]
LENGTHS = [5, 7, 4, 6]  # frames per episode; episode e does task e % 2
PI_COLUMNS = ("image", "wrist_image", "state", "actions")
V3_COLUMNS = ("observation.images.image", "observation.images.image2", "observation.state", "action")


def _encode(episode: int, frame: int, camera: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10 * episode, frame, camera)).save(buffer, format=fmt)
    return buffer.getvalue()


def _frames(lengths=LENGTHS, fmt="PNG", first_episode=0) -> dict[str, list]:
    """Columns of all frames (source-neutral names)."""
    rows: dict[str, list] = {k: [] for k in ("agent", "wrist", "state", "action", "episode", "frame", "task", "index")}
    for offset, length in enumerate(lengths):
        episode = first_episode + offset
        for frame in range(length):
            rows["agent"].append({"bytes": _encode(episode, frame, 0, fmt), "path": None})
            rows["wrist"].append({"bytes": _encode(episode, frame, 1, fmt), "path": None})
            rows["state"].append([episode, frame, 0.5, 0.0, 0.0, 0.0, 0.04, -0.04])
            rows["action"].append([episode, frame, 0.0, 0.0, 0.0, 0.0, -1.0 if frame < 2 else 1.0])
            rows["episode"].append(episode)
            rows["frame"].append(frame)
            rows["task"].append(episode % 2)
            rows["index"].append(len(rows["index"]))
    return rows


def _info(version: str, lengths, names, fps: int, *, video: bool = False, splits=None) -> dict:
    image = {"dtype": "video" if video else "image", "shape": [8, 8, 3], "names": ["height", "width", "channel"]}
    features = {
        names[0]: image,
        names[1]: image,
        names[2]: {"dtype": "float32", "shape": [8], "names": None},
        names[3]: {"dtype": "float32", "shape": [7], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    info = {
        "codebase_version": version,
        "fps": fps,
        "total_episodes": len(lengths),
        "total_frames": sum(lengths),
        "total_tasks": len(TASKS),
        "chunks_size": 1000,
        "splits": splits or {"train": f"0:{len(lengths)}"},
        "features": features,
    }
    if version.startswith("v2"):
        info["data_path"] = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    else:
        info["data_path"] = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    return info


def write_v2(root: Path, lengths=LENGTHS, names=PI_COLUMNS, fmt="PNG", splits=None) -> Path:
    """A LeRobot v2.0 folder like physical-intelligence/libero (written through `datasets`)."""
    rows = _frames(lengths, fmt)
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(_info("v2.0", lengths, names, 10, splits=splits)))
    (root / "meta" / "tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(TASKS)))
    (root / "meta" / "episodes.jsonl").write_text(
        "".join(json.dumps({"episode_index": e, "tasks": [TASKS[e % 2]], "length": n}) + "\n" for e, n in enumerate(lengths))
    )
    features = datasets.Features(
        {
            names[0]: datasets.Image(),
            names[1]: datasets.Image(),
            names[2]: datasets.List(datasets.Value("float32"), length=8),
            names[3]: datasets.List(datasets.Value("float32"), length=7),
            "timestamp": datasets.Value("float32"),
            "frame_index": datasets.Value("int64"),
            "episode_index": datasets.Value("int64"),
            "index": datasets.Value("int64"),
            "task_index": datasets.Value("int64"),
        }
    )
    table = {
        names[0]: rows["agent"],
        names[1]: rows["wrist"],
        names[2]: rows["state"],
        names[3]: rows["action"],
        "timestamp": [f / 10 for f in rows["frame"]],
        "frame_index": rows["frame"],
        "episode_index": rows["episode"],
        "index": rows["index"],
        "task_index": rows["task"],
    }
    full = datasets.Dataset.from_dict(table, features=features)
    (root / "data" / "chunk-000").mkdir(parents=True)
    episodes = np.asarray(rows["episode"])
    for episode in range(len(lengths)):
        full.select(np.flatnonzero(episodes == episode)).to_parquet(str(root / f"data/chunk-000/episode_{episode:06d}.parquet"))
    return root


def write_v3(root: Path, lengths=LENGTHS, names=V3_COLUMNS, *, video: bool = False, one_file: bool = False) -> Path:
    """A LeRobot v3.0 folder like HuggingFaceVLA/libero: many episodes per file, no `datasets` metadata."""
    rows = _frames(lengths, "JPEG")
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(_info("v3.0", lengths, names, 10, video=video)))
    # LeRobot writes tasks as a pandas frame indexed by the instruction.
    pd.DataFrame({"task_index": range(len(TASKS))}, index=TASKS).to_parquet(root / "meta" / "tasks.parquet")
    pq.write_table(
        pa.table({"episode_index": range(len(lengths)), "length": lengths}),
        root / "meta" / "episodes" / "chunk-000" / "file-000.parquet",
    )
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            names[0]: pa.array(rows["agent"], image),
            names[1]: pa.array(rows["wrist"], image),
            names[2]: pa.array(rows["state"], pa.list_(pa.float32(), 8)),
            names[3]: pa.array(rows["action"], pa.list_(pa.float32(), 7)),
            "frame_index": rows["frame"],
            "episode_index": rows["episode"],
            "index": rows["index"],
            "task_index": rows["task"],
        }
    )
    (root / "data" / "chunk-000").mkdir(parents=True)
    half = len(table) if one_file else sum(lengths[:2])  # episodes 0-1 in file-000, the rest in file-001
    pq.write_table(table.slice(0, half), root / "data" / "chunk-000" / "file-000.parquet")
    if not one_file:
        pq.write_table(table.slice(half), root / "data" / "chunk-000" / "file-001.parquet")
    return root


def _colour(view: torch.Tensor) -> tuple[int, int, int]:
    """The solid colour of a (3, H, W) view."""
    return tuple(int(round(float(c))) for c in view.float().mean(dim=(1, 2)))


@pytest.fixture()
def v2_dir(tmp_path: Path) -> Path:
    return write_v2(tmp_path / "v2")


@pytest.fixture()
def v3_dir(tmp_path: Path) -> Path:
    return write_v3(tmp_path / "v3")


# --- layouts and loading ---------------------------------------------------------------------


def test_detect_layout(v2_dir: Path, v3_dir: Path, tmp_path: Path) -> None:
    assert detect_layout(v2_dir) == LAYOUT_LEROBOT_V2
    assert detect_layout(v3_dir) == LAYOUT_LEROBOT_V3
    load_libero(str(v2_dir)).save_to_disk(str(tmp_path / "saved"))
    assert detect_layout(tmp_path / "saved") == LAYOUT_SAVED
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unknown dataset layout .*found \['notes.txt'\].*expected a LeRobot"):
        detect_layout(tmp_path / "junk")


@pytest.mark.parametrize("layout", ["v2", "v3"])
def test_load_lerobot_layouts(layout: str, tmp_path: Path) -> None:
    root = write_v2(tmp_path / "d") if layout == "v2" else write_v3(tmp_path / "d")
    dataset = load_libero(str(root))
    assert dataset.column_names == [*CANONICAL_COLUMNS, TASK_INDEX]
    assert len(dataset) == sum(LENGTHS)
    assert isinstance(dataset.features[AGENT_IMAGE], datasets.Image)  # v3 had no metadata: cast
    episodes = np.asarray(dataset[EPISODE_INDEX])
    assert np.bincount(episodes).tolist() == LENGTHS
    row = dataset[LENGTHS[0] + 3]  # episode 1, frame 3
    assert (row[EPISODE_INDEX], row[FRAME_INDEX], row[TASK_INDEX]) == (1, 3, 1)
    assert row[INSTRUCTION] == TASKS[1]
    assert row[STATE][:2] == [1.0, 3.0] and row[ACTION] == [1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    pixel = np.asarray(row[AGENT_IMAGE])[4, 4]  # decoded to PIL, uint8
    assert np.abs(pixel.astype(int) - [10, 3, 0]).max() <= 2  # JPEG in v3: within 2 levels
    assert np.abs(np.asarray(row[WRIST_IMAGE])[4, 4].astype(int) - [10, 3, 1]).max() <= 2
    assert sorted(set(dataset[INSTRUCTION])) == sorted(TASKS)


def test_lerobot_image_schema_and_overrides(tmp_path: Path) -> None:
    lerobot = write_v2(tmp_path / "lerobot", names=("observation.images.image", "observation.images.wrist_image", "observation.state", "action"))
    assert describe(str(lerobot))["schema"] == "lerobot/libero_*_image"
    assert load_libero(str(lerobot))[0][FRAME_INDEX] == 0

    odd = write_v2(tmp_path / "odd", names=("front", "hand", "qpos", "act"))
    expected = r"found columns \[.*'act'.*'front'.*\].*physical-intelligence/libero: missing \['actions', 'image', 'state', 'wrist_image'\]"
    with pytest.raises(ValueError, match=expected):
        load_libero(str(odd))
    columns = {AGENT_IMAGE: "front", WRIST_IMAGE: "hand", STATE: "qpos", ACTION: "act"}
    dataset = load_libero(str(odd), columns=columns)
    assert dataset[5][ACTION][:2] == [1.0, 0.0]
    assert describe(str(odd), columns=columns)["columns"][WRIST_IMAGE] == "hand"
    with pytest.raises(ValueError, match="unknown canonical name"):
        load_libero(str(odd), columns={"rgb": "front"})


def test_saved_dataset_round_trip(v2_dir: Path, tmp_path: Path) -> None:
    original = load_libero(str(v2_dir))
    original.save_to_disk(str(tmp_path / "saved"))
    reloaded = load_libero(str(tmp_path / "saved"))
    assert reloaded.column_names == original.column_names
    assert reloaded[7][STATE] == original[7][STATE] and reloaded[7][INSTRUCTION] == original[7][INSTRUCTION]
    assert len(load_libero(str(tmp_path / "saved"), max_episodes=2)) == LENGTHS[0] + LENGTHS[1]

    datasets.DatasetDict({"train": original, "test": original.select(range(3))}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_libero(str(tmp_path / "dict"), split="test")) == 3
    with pytest.raises(ValueError, match=r"split 'val' not in .*available splits: \['test', 'train'\]"):
        load_libero(str(tmp_path / "dict"), split="val")
    info = describe(str(tmp_path / "saved"))
    assert (info["layout"], info["num_episodes"], info["num_frames"], info["fps"]) == (LAYOUT_SAVED, 4, sum(LENGTHS), None)
    assert (info["state_dim"], info["action_dim"], info["cameras"]) == (8, 7, [AGENT_IMAGE, WRIST_IMAGE])


def test_split_and_max_episodes_from_metadata(tmp_path: Path) -> None:
    root = write_v2(tmp_path / "d", splits={"train": "0:3", "test": "3:4"})
    assert np.unique(load_libero(str(root))[EPISODE_INDEX]).tolist() == [0, 1, 2]
    assert np.unique(load_libero(str(root), split="test")[EPISODE_INDEX]).tolist() == [3]
    assert np.unique(load_libero(str(root), max_episodes=2)[EPISODE_INDEX]).tolist() == [0, 1]
    v3 = write_v3(tmp_path / "v3")
    assert np.unique(load_libero(str(v3), max_episodes=3)[EPISODE_INDEX]).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"split 'validation' not in .*available splits: \['test', 'train'\]"):
        load_libero(str(root), split="validation")


def test_sim_demos_fixture_against_pyarrow(sim_demos_dir: Path) -> None:
    dataset = load_libero(str(sim_demos_dir))
    assert len(dataset) == 7056
    assert np.unique(dataset[EPISODE_INDEX]).size == 60
    by_task = dict(zip(dataset[TASK_INDEX], dataset[INSTRUCTION]))
    assert by_task == {
        0: "pick up the black bowl between the plate and the ramekin and place it on the plate",
        1: "pick up the black bowl next to the ramekin and place it on the plate",
        2: "pick up the black bowl from table center and place it on the plate",
    }
    raw = pq.read_table(sim_demos_dir / "data" / "chunk-000" / "episode_000037.parquet")
    start = int(np.flatnonzero(np.asarray(dataset[EPISODE_INDEX]) == 37)[0])
    for frame in (0, 11, raw.num_rows - 1):
        row = dataset.with_format("arrow")[start + frame]
        assert row.column(FRAME_INDEX)[0].as_py() == frame
        assert row.column(STATE)[0].as_py() == raw.column("state")[frame].as_py()
        assert row.column(ACTION)[0].as_py() == raw.column("actions")[frame].as_py()
        assert row.column(AGENT_IMAGE)[0].as_py()["bytes"] == raw.column("image")[frame].as_py()["bytes"]
        assert row.column(WRIST_IMAGE)[0].as_py()["bytes"] == raw.column("wrist_image")[frame].as_py()["bytes"]
    assert dataset[start][INSTRUCTION] == by_task[raw.column("task_index")[0].as_py()]


@pytest.mark.parametrize("repo_id", ["physical-intelligence/libero", "HuggingFaceVLA/libero"])
def test_hub_id_from_offline_cache(repo_id: str, tmp_path: Path) -> None:
    """A Hub id resolves through `snapshot_download`; offline, a cached snapshot is what it returns."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / ("datasets--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    write = write_v2 if repo_id.startswith("physical") else write_v3
    write(repo / "snapshots" / commit)
    cache = str(tmp_path / "hub")

    dataset = load_libero(repo_id, cache_dir=cache)
    assert len(dataset) == sum(LENGTHS) and dataset[0][INSTRUCTION] == TASKS[0]
    assert len(load_libero(repo_id, revision=commit, cache_dir=cache)) == sum(LENGTHS)
    assert np.unique(load_libero(repo_id, max_episodes=2, cache_dir=cache)[EPISODE_INDEX]).tolist() == [0, 1]
    info = describe(repo_id, cache_dir=cache)
    assert (info["source"], info["revision"], info["num_frames"]) == (repo_id, commit, sum(LENGTHS))
    with pytest.raises(ValueError, match=f"could not get Hub dataset '{repo_id}' .revision v9"):
        load_libero(repo_id, revision="v9", cache_dir=cache)


def test_streaming_gives_the_same_samples(v2_dir: Path, v3_dir: Path, tmp_path: Path) -> None:
    spec = SampleSpec(image_size=16, num_temporal_frames=2, temporal_stride=2, action_horizon=3)
    for root in (v2_dir, v3_dir):
        stream = load_libero(str(root), streaming=True)
        assert isinstance(stream, datasets.IterableDataset)
        streamed = list(LiberoSampleStream(stream, spec))
        mapped = LiberoSamples(load_libero(str(root)), spec)
        assert len(streamed) == len(mapped) == sum(LENGTHS)
        for index in (0, 4, 9, len(mapped) - 1):
            for key, value in mapped[index].items():
                other = streamed[index][key]
                assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key

    # DataLoader workers split the stream: by parquet file (v2: 4 files) or, with fewer files than
    # workers (v3 in one file), by episode. Every sample arrives exactly once.
    everything = [(e, f) for e, n in enumerate(LENGTHS) for f in range(n)]
    for root in (v2_dir, write_v3(tmp_path / "one_file", one_file=True)):
        loader = torch.utils.data.DataLoader(
            LiberoSampleStream(load_libero(str(root), streaming=True), spec), batch_size=4, num_workers=2, collate_fn=collate
        )
        seen = [(e, f) for b in loader for e, f in zip(b[EPISODE_INDEX].tolist(), b[FRAME_INDEX].tolist())]
        assert sorted(seen) == everything

    shuffled = list(LiberoSampleStream(load_libero(str(v2_dir), streaming=True), spec, shuffle_buffer_size=8, seed=1))
    order = [(s[EPISODE_INDEX], s[FRAME_INDEX]) for s in shuffled]
    assert sorted(order) == everything and order != sorted(order)


def test_data_info_json(v2_dir: Path, v3_dir: Path, capsys: pytest.CaptureFixture) -> None:
    for root, layout, schema in ((v2_dir, LAYOUT_LEROBOT_V2, "physical-intelligence/libero"), (v3_dir, LAYOUT_LEROBOT_V3, "HuggingFaceVLA/libero")):
        assert main(["data-info", str(root), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["layout"] == layout and info["schema"] == schema
        assert (info["num_episodes"], info["num_frames"], info["tasks"]) == (4, sum(LENGTHS), TASKS)
        assert (info["state_dim"], info["action_dim"], info["fps"]) == (8, 7, 10)
        assert info["cameras"] == list((PI_COLUMNS if layout == LAYOUT_LEROBOT_V2 else V3_COLUMNS)[:2])
    assert main(["data-info", str(v2_dir)]) == 0
    assert "lerobot-v2" in capsys.readouterr().out
    assert main(["data-info", str(v2_dir / "missing")]) == 2
    assert f"data source {v2_dir / 'missing'} does not exist" in capsys.readouterr().err


def test_data_info_sim_demos(sim_demos_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data-info", str(sim_demos_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["num_episodes"], info["num_frames"], info["fps"], len(info["tasks"])) == (60, 7056, 20, 3)
    assert info["cameras"] == ["image", "wrist_image"]


# --- bad inputs --------------------------------------------------------------------------------


def test_corrupt_parquet(v2_dir: Path) -> None:
    bad = v2_dir / "data" / "chunk-000" / "episode_000002.parquet"
    bad.write_bytes(b"not a parquet file at all")
    with pytest.raises(ValueError, match=r"episode_000002\.parquet: not a readable parquet file"):
        load_libero(str(v2_dir))


def test_missing_column_in_one_file(v2_dir: Path) -> None:
    path = v2_dir / "data" / "chunk-000" / "episode_000003.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["actions"]), path)
    with pytest.raises(ValueError, match=r"episode_000003\.parquet: missing column\(s\) \['actions'\]"):
        load_libero(str(v2_dir))


def _poison(root: Path, episode: int, frame: int, column: str, dim: int, value: float) -> None:
    """Put `value` into `column[dim]` of one frame of a written LeRobot v2 folder."""
    path = root / "data" / "chunk-000" / f"episode_{episode:06d}.parquet"
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[table.column("frame_index").to_pylist().index(frame)][dim] = value
    index = table.schema.get_field_index(column)
    pq.write_table(table.set_column(index, table.field(index), pa.array(values, table.field(index).type)), path)


def test_non_finite_state_or_action_named_before_training(v2_dir: Path) -> None:
    # the sample paths check on their own, so statistics given in the config (no compute_norm_stats) do not hide it
    _poison(v2_dir, episode=2, frame=3, column="actions", dim=1, value=float("nan"))
    message = r"column 'action' holds a non-finite value \(nan\) at episode 2, frame 3, dimension 1"
    with pytest.raises(ValueError, match=message):
        LiberoSamples(load_libero(str(v2_dir)), SampleSpec(image_size=16))
    with pytest.raises(ValueError, match=message):
        list(LiberoSampleStream(load_libero(str(v2_dir), streaming=True), SampleSpec(image_size=16)))
    _poison(v2_dir, episode=1, frame=0, column="state", dim=7, value=float("inf"))  # the state column is checked too
    with pytest.raises(ValueError, match=r"column 'observation.state' holds a non-finite value \(inf\) at episode 1, frame 0"):
        LiberoSamples(load_libero(str(v2_dir)), SampleSpec(image_size=16))


def test_an_image_that_does_not_decode_is_named(v2_dir: Path) -> None:
    path = v2_dir / "data" / "chunk-000" / "episode_000002.parquet"
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[3] = {"bytes": b"\x89PNG truncated", "path": None}
    index = table.schema.get_field_index("image")
    pq.write_table(table.set_column(index, table.field(index), pa.array(images, table.field(index).type)), path)
    samples = LiberoSamples(load_libero(str(v2_dir)), SampleSpec(image_size=16))
    message = rf"column '{AGENT_IMAGE}', episode 2, frame 3: could not decode image bytes"
    with pytest.raises(ValueError, match=message):
        samples[LENGTHS[0] + LENGTHS[1] + 3]
    with pytest.raises(ValueError, match=message):
        list(LiberoSampleStream(load_libero(str(v2_dir), streaming=True), SampleSpec(image_size=16)))


def test_unknown_sources_are_named_with_the_nearest_path_or_hub_id(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "data" / "sim_demos").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(f"data source {tmp_path / 'nowhere'} does not exist: no "
                                                          "such file or folder, and not a Hub dataset id of the form "
                                                          "'org/name'") + "$"):
        load_libero(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"data source {tmp_path / 'data' / 'sim_demo'} does not exist")
                       + ".*" + re.escape(f"(did you mean {tmp_path / 'data' / 'sim_demos'}?)")):
        load_libero(str(tmp_path / "data" / "sim_demo"))
    monkeypatch.chdir(tmp_path)  # relative names are read against the working directory
    with pytest.raises(FileNotFoundError, match=re.escape(f"data source {tmp_path / 'not a dataset'} does not exist")):
        load_libero("not a dataset")
    with pytest.raises(FileNotFoundError, match=re.escape("(did you mean the Hub dataset lerobot/libero_spatial_image?)")):
        load_libero("lerobot/libero_spatial_image/")
    with pytest.raises(ValueError, match="could not get Hub dataset 'someone/absent'") as error:
        load_libero("someone/absent", cache_dir=str(tmp_path / "hub"))
    assert "did you mean" not in str(error.value)
    # owner/name-shaped and not on disk: asked of the Hub, and the local folder it was probably meant to be is named
    with pytest.raises(ValueError, match=re.escape("could not get Hub dataset 'data/sim_demo'") + ".*"
                       + re.escape(f"(no such local folder either; did you mean {tmp_path / 'data' / 'sim_demos'}?)")):
        load_libero("data/sim_demo", cache_dir=str(tmp_path / "hub"))


def test_video_cameras_and_missing_tasks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"stored as video"):
        load_libero(str(write_v3(tmp_path / "video", video=True)))
    root = write_v2(tmp_path / "notasks")
    (root / "meta" / "tasks.jsonl").write_text(json.dumps({"task_index": 0, "task": TASKS[0]}) + "\n")
    with pytest.raises(ValueError, match=r"task_index \[1\] not in the task table"):
        load_libero(str(root))
    (root / "meta" / "tasks.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="tasks.jsonl not found"):
        load_libero(str(root))


# --- episode split -----------------------------------------------------------------------------


def test_split_has_no_leakage_and_is_deterministic(sim_demos_dir: Path) -> None:
    dataset = load_libero(str(sim_demos_dir))
    train, val = split_episodes(dataset, DataConfig(val_fraction=0.1, split_seed=3))
    train_eps, val_eps = set(train[EPISODE_INDEX]), set(val[EPISODE_INDEX])
    assert len(val_eps) == 6 and not train_eps & val_eps and train_eps | val_eps == set(range(60))
    assert len(train) + len(val) == len(dataset)
    again = split_episodes(dataset, DataConfig(val_fraction=0.1, split_seed=3))[1]
    assert set(again[EPISODE_INDEX]) == val_eps
    assert set(split_episodes(dataset, DataConfig(val_fraction=0.1, split_seed=4))[1][EPISODE_INDEX]) != val_eps
    # Samples over the training split never reach into a validation episode.
    samples = LiberoSamples(train, SampleSpec(action_horizon=4))
    assert set(samples._frames.episode.tolist()) == train_eps


def test_split_explicit_lists_and_errors(v2_dir: Path) -> None:
    dataset = load_libero(str(v2_dir))
    train, val = split_episodes(dataset, DataConfig(val_episodes=[2]))
    assert sorted(set(val[EPISODE_INDEX])) == [2] and sorted(set(train[EPISODE_INDEX])) == [0, 1, 3]
    train, val = split_episodes(dataset, DataConfig(train_episodes=[0, 1], val_episodes=[3]))
    assert sorted(set(train[EPISODE_INDEX])) == [0, 1] and sorted(set(val[EPISODE_INDEX])) == [3]
    train, val = split_episodes(dataset, DataConfig(val_fraction=0.0))
    assert len(train) == len(dataset) and len(val) == 0
    with pytest.raises(ValueError, match=r"val_episodes has episode\(s\) \[7, 9\] that are not in the dataset"):
        split_episodes(dataset, DataConfig(val_episodes=[1, 7, 9]))
    with pytest.raises(ValueError, match="training split is empty"):
        split_episodes(dataset, DataConfig(val_episodes=[0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"episode\(s\) \[1\] are in both"):
        split_episodes(dataset, DataConfig(train_episodes=[0, 1], val_episodes=[1]))
    with pytest.raises(ValueError, match="validation split is empty"):
        split_episodes(dataset, DataConfig(train_episodes=[0, 1, 2, 3]))
    with pytest.raises(ValueError, match="val_fraction must be in"):
        DataConfig(val_fraction=1.0)


def test_load_train_val_streaming_matches_map_style(v2_dir: Path) -> None:
    config = DataConfig(source=str(v2_dir), val_episodes=[1])
    train, val = load_train_val(config)
    streamed_train, streamed_val = load_train_val(DataConfig(source=str(v2_dir), val_episodes=[1], streaming=True))
    assert sorted({r[EPISODE_INDEX] for r in streamed_val}) == [1]
    assert [r[FRAME_INDEX] for r in streamed_train] == train[FRAME_INDEX]


# --- samples -----------------------------------------------------------------------------------


def test_chunk_padding_at_episode_end(v2_dir: Path) -> None:
    samples = LiberoSamples(load_libero(str(v2_dir)), SampleSpec(image_size=16, action_horizon=4))
    last = LENGTHS[0] - 1  # episode 0, last frame (4)
    sample = samples[last]
    assert (sample[EPISODE_INDEX], sample[FRAME_INDEX]) == (0, 4)
    assert sample[ACTIONS_PAD_MASK].tolist() == [False, True, True, True]
    assert sample[ACTIONS][:, :2].tolist() == [[0, 4]] * 4  # padded steps repeat the last action
    sample = samples[LENGTHS[0] + 4]  # episode 1 (7 frames), frame 4
    assert sample[ACTIONS_PAD_MASK].tolist() == [False, False, False, True]
    assert sample[ACTIONS][:, :2].tolist() == [[1, 4], [1, 5], [1, 6], [1, 6]]
    assert sample[ACTIONS][:, 6].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert samples[0][ACTIONS][:, 6].tolist() == [-1.0, -1.0, 1.0, 1.0]  # gripper stays -1 open / +1 close
    assert sample[OBS_STATE].tolist()[:2] == [1.0, 4.0] and sample[OBS_STATE].dtype == torch.float32
    sample[OBS_STATE].mul_(0)  # an in-place change to a sample leaves the dataset alone
    assert samples[LENGTHS[0] + 4][OBS_STATE].tolist()[:2] == [1.0, 4.0]


def test_temporal_context_and_camera_order(v2_dir: Path) -> None:
    spec = SampleSpec(image_size=12, num_temporal_frames=3, temporal_stride=2, action_horizon=2)
    samples = LiberoSamples(load_libero(str(v2_dir)), spec)
    sample = samples[LENGTHS[0] + 5]  # episode 1, frame 5
    views = sample[OBS_IMAGES]
    assert views.shape == (6, 3, 12, 12) and views.dtype == torch.uint8
    # current frame first, then frames 3 and 1; each as [agentview (B=0), wrist (B=1)]
    assert [_colour(v) for v in views] == [(10, 5, 0), (10, 5, 1), (10, 3, 0), (10, 3, 1), (10, 1, 0), (10, 1, 1)]
    early = samples[LENGTHS[0] + 1]  # frame 1: context clamps to the episode start
    assert [_colour(v)[1] for v in early[OBS_IMAGES]] == [1, 1, 0, 0, 0, 0]
    no_wrist = LiberoSamples(load_libero(str(v2_dir)), SampleSpec(image_size=12, use_wrist_camera=False, num_temporal_frames=2))
    assert [_colour(v) for v in no_wrist[2][OBS_IMAGES]] == [(0, 2, 0), (0, 1, 0)]


def test_collate_and_dataloader_workers(v2_dir: Path) -> None:
    samples = LiberoSamples(load_libero(str(v2_dir)), SampleSpec(image_size=16, action_horizon=3))
    batch = collate([samples[i] for i in (0, 6, 20)])
    assert batch[OBS_IMAGES].shape == (3, 2, 3, 16, 16) and batch[OBS_IMAGES].dtype == torch.uint8
    assert batch[ACTIONS].shape == (3, 3, 7) and batch[ACTIONS_PAD_MASK].dtype == torch.bool
    assert batch[INSTRUCTION] == [TASKS[0], TASKS[1], TASKS[1]]
    assert batch[EPISODE_INDEX].tolist() == [0, 1, 3] and batch[FRAME_INDEX].tolist() == [0, 1, 4]
    loader = torch.utils.data.DataLoader(samples, batch_size=5, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert torch.equal(torch.cat([b[OBS_IMAGES] for b in batches]), collate([samples[i] for i in range(len(samples))])[OBS_IMAGES])
    with pytest.raises(IndexError):
        samples[len(samples)]


def test_samples_need_canonical_columns(v2_dir: Path) -> None:
    raw = datasets.load_dataset("parquet", data_files=str(v2_dir / "data/chunk-000/*.parquet"), split="train")
    with pytest.raises(ValueError, match=r"missing canonical column\(s\) \['observation.images.agentview'"):
        LiberoSamples(raw, SampleSpec())
