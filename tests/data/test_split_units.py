"""The episode split and `load_train_val` by value: exact messages, how many episodes validate (and which,
from the seed), and every DataConfig setting that reaches the loader (columns, split, max_episodes,
streaming, revision, cache_dir), with one source and with several."""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from atlas_vla.constants import (
    ACTION,
    AGENT_IMAGE,
    EPISODE_INDEX,
    FRAME_INDEX,
    INSTRUCTION,
    SOURCE_INDEX,
    STATE,
    WRIST_IMAGE,
)
from atlas_vla.data.config import DataConfig
from atlas_vla.data.lerobot_writer import LeRobotV2Writer
from atlas_vla.data.split import load_train_val, split_episodes

FLOAT32_LIST = datasets.List(datasets.Value("float32"))


def write_lerobot(path: Path, lengths: list[int], *, fps: int = 20) -> Path:
    """A LeRobot v2 folder (real writer): episode e has lengths[e] frames; state[0] = 100 * e + frame."""
    writer = LeRobotV2Writer(path, fps=fps)
    for episode, length in enumerate(lengths):
        images = np.full((length, 8, 8, 3), episode, dtype=np.uint8)
        states = np.zeros((length, 8), np.float32)
        states[:, 0] = 100 * episode + np.arange(length)
        writer.add_episode(images, images, states, np.zeros((length, 7), np.float32), f"task {episode}")
    return writer.close()


def saved_source(path: Path, splits: dict[str, int], *, episodes: int = 2) -> Path:
    """A `save_to_disk` DatasetDict; in split s, observation.state is splits[s]-D (a decoy for a columns=
    override) and 'proprio' is the 8-D state, with proprio[0] = 10 * episode."""
    def split(decoy_dim: int) -> datasets.Dataset:
        image = Image.new("RGB", (4, 4))
        return datasets.Dataset.from_dict({
            AGENT_IMAGE: [image] * episodes, WRIST_IMAGE: [image] * episodes,
            STATE: [[0.0] * decoy_dim] * episodes, "proprio": [[10.0 * e] + [0.0] * 7 for e in range(episodes)],
            ACTION: [[0.0] * 7] * episodes, INSTRUCTION: ["pick"] * episodes,
            EPISODE_INDEX: list(range(episodes)), FRAME_INDEX: [0] * episodes,
        }, features=datasets.Features({
            AGENT_IMAGE: datasets.Image(), WRIST_IMAGE: datasets.Image(), STATE: FLOAT32_LIST, "proprio": FLOAT32_LIST,
            ACTION: FLOAT32_LIST, INSTRUCTION: datasets.Value("string"), EPISODE_INDEX: datasets.Value("int64"),
            FRAME_INDEX: datasets.Value("int64")}))

    datasets.DatasetDict({name: split(dim) for name, dim in splits.items()}).save_to_disk(str(path))
    return path


def hub_repo(cache: Path, repo_id: str, revisions: dict[str, list[int]]) -> None:
    """An offline Hub cache entry: one snapshot per named revision (its episode lengths)."""
    repo = cache / ("datasets--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    for number, (revision, lengths) in enumerate(revisions.items()):
        commit = str(number) * 40
        (repo / "refs" / revision).write_text(commit)
        write_lerobot(repo / "snapshots" / commit, lengths)


def episode_table(episodes: list[int]) -> datasets.Dataset:
    """Two frames per episode."""
    return datasets.Dataset.from_dict({EPISODE_INDEX: [e for e in episodes for _ in range(2)],
                                       FRAME_INDEX: [f for _ in episodes for f in range(2)]})


def episodes_of(table) -> list[int]:
    return sorted({row[EPISODE_INDEX] for row in table})


def error_message(call) -> str:
    with pytest.raises(ValueError) as error:
        call()
    return str(error.value)


# --- split_episodes --------------------------------------------------------------------------------


def test_split_messages_are_exact():
    stream = episode_table([2, 3, 5, 6]).to_iterable_dataset()
    assert error_message(lambda: split_episodes(stream, DataConfig())) == (
        "split_episodes on a streaming dataset needs episode_ids= (see load_train_val)")
    assert error_message(lambda: split_episodes(episode_table([]), DataConfig())) == (
        "cannot split an empty dataset: it has no episodes")
    assert error_message(lambda: split_episodes(stream, DataConfig(), episode_ids=[])) == (
        "cannot split an empty dataset: it has no episodes")
    ids = [6, 2, 5, 3]  # any order: the message names them sorted
    assert error_message(lambda: split_episodes(stream, DataConfig(val_episodes=[4, 9]), episode_ids=ids)) == (
        "DataConfig.val_episodes has episode(s) [4, 9] that are not in the dataset (4 episodes, indices 2..6)")
    assert error_message(lambda: split_episodes(stream, DataConfig(train_episodes=[1, 2]), episode_ids=ids)) == (
        "DataConfig.train_episodes has episode(s) [1] that are not in the dataset (4 episodes, indices 2..6)")
    assert error_message(lambda: split_episodes(stream, DataConfig(train_episodes=[2, 3, 5, 6]), episode_ids=ids)) == (
        "the validation split is empty: train_episodes covers all 4 episodes; "
        "set val_fraction=0 to train without validation")


@pytest.mark.parametrize("fraction,count", [(0.01, 1), (0.04, 1), (0.06, 1), (0.15, 2), (0.25, 2), (0.35, 4)])
def test_the_validation_share_is_rounded_and_at_least_one_episode(fraction, count):
    available = list(range(10, 20))
    train, val = split_episodes(episode_table(available), DataConfig(val_fraction=fraction, split_seed=7))
    expected = sorted(np.random.default_rng(7).permutation(np.asarray(available))[:count].tolist())
    assert episodes_of(val) == expected and len(expected) == count  # round(10 * fraction), never 0 when > 0
    assert episodes_of(train) == sorted(set(available) - set(expected))


# --- load_train_val: what reaches the loader ---------------------------------------------------------


def test_one_source_loads_with_the_configs_max_episodes_and_streaming(tmp_path):
    root = str(write_lerobot(tmp_path / "source", [2, 3, 1]))
    train, val = load_train_val(DataConfig(source=root, max_episodes=2, val_fraction=0.0))
    assert isinstance(train, datasets.Dataset) and train[EPISODE_INDEX] == [0, 0, 1, 1, 1] and len(val) == 0
    train, val = load_train_val(DataConfig(source=root, streaming=True, val_episodes=[2]))
    assert isinstance(train, datasets.IterableDataset) and isinstance(val, datasets.IterableDataset)
    assert [row[STATE][0] for row in train] == [0, 1, 100, 101, 102] and [row[STATE][0] for row in val] == [200]


def test_the_configs_columns_and_split_reach_every_source(tmp_path):
    # observation.state is 9-D in the holdout split of `a`: only the columns override makes the sources alike
    a = str(saved_source(tmp_path / "a", {"holdout": 9, "train": 8}))
    b = str(saved_source(tmp_path / "b", {"holdout": 8}, episodes=3))
    config = DataConfig(source=[a, b], split="holdout", columns={STATE: "proprio"}, val_fraction=0.0)
    train, val = load_train_val(config)
    assert [row[STATE][0] for row in train] == [0.0, 10.0, 0.0, 10.0, 20.0] and len(val) == 0
    assert train[EPISODE_INDEX] == [0, 1, 2, 3, 4] and train[SOURCE_INDEX] == [0, 0, 1, 1, 1]
    single, _ = load_train_val(DataConfig(source=a, split="holdout", columns={STATE: "proprio"}, val_fraction=0.0))
    assert [row[STATE][0] for row in single] == [0.0, 10.0]
    with pytest.raises(ValueError, match=re.escape("disagree on state_dim: 9 vs 8")):
        load_train_val(DataConfig(source=[a, b], split="holdout", val_fraction=0.0))


def test_episode_offsets_accumulate_over_every_source(tmp_path):
    roots = [str(write_lerobot(tmp_path / name, lengths)) for name, lengths in
             (("a", [1, 1]), ("b", [2]), ("c", [1, 1, 1]))]
    for streaming in (False, True):
        train, val = load_train_val(DataConfig(source=roots, val_fraction=0.0, streaming=streaming))
        rows = [(row[EPISODE_INDEX], row[FRAME_INDEX], row[SOURCE_INDEX], row[STATE][0]) for row in train]
        assert rows == [(0, 0, 0, 0), (1, 0, 0, 100), (2, 0, 1, 0), (2, 1, 1, 1), (3, 0, 2, 0), (4, 0, 2, 100),
                        (5, 0, 2, 200)]
        assert list(val) == []


def test_several_streamed_sources_are_split_by_their_own_episodes(tmp_path):
    roots = [str(write_lerobot(tmp_path / name, [1] * 4)) for name in ("a", "b")]
    config = DataConfig(source=roots, val_fraction=0.25, split_seed=1, streaming=True)
    train, val = load_train_val(config)
    assert isinstance(train, datasets.IterableDataset)
    alone = episodes_of(load_train_val(DataConfig(source=roots[0], val_fraction=0.25, split_seed=1))[1])
    assert episodes_of(val) == alone + [4 + e for e in alone] and len(alone) == 1
    assert episodes_of(train) == sorted(set(range(8)) - set(episodes_of(val)))


def test_hub_sources_load_from_the_configs_cache_and_revision(tmp_path):
    cache = tmp_path / "hub"
    hub_repo(cache, "org/first", {"main": [2, 2, 2], "v1": [1, 1]})
    hub_repo(cache, "org/second", {"main": [3]})
    train, _ = load_train_val(DataConfig(source="org/first", revision="v1", cache_dir=str(cache), val_fraction=0.0))
    assert train[EPISODE_INDEX] == [0, 1]
    train, _ = load_train_val(DataConfig(source="org/first", cache_dir=str(cache), val_fraction=0.0))
    assert train[EPISODE_INDEX] == [0, 0, 1, 1, 2, 2]
    train, _ = load_train_val(DataConfig(source=["org/first", "org/second"], cache_dir=str(cache), val_fraction=0.0))
    assert train[EPISODE_INDEX] == [0, 0, 1, 1, 2, 2, 3, 3, 3] and train[SOURCE_INDEX] == [0] * 6 + [1] * 3
