"""The mixture's parts one by one: what `source_profile` reads, when `check_compatible` refuses, the columns
and dtypes `tag_source` writes (table and stream), what `join_sources` casts, and `SourceWeightedSampler`'s
shares, errors and epochs, checked by value."""

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
    TASK_INDEX,
    WRIST_IMAGE,
)
from atlas_vla.data.lerobot_writer import LeRobotV2Writer
from atlas_vla.data.mixture import SourceWeightedSampler, check_compatible, join_sources, source_profile, tag_source
from atlas_vla.data.sources import load_libero

INT64 = datasets.Value("int64")
FLOAT32_LIST = datasets.List(datasets.Value("float32"))


def write_lerobot(path: Path, episodes: int, *, fps: int = 20, size: int = 16, seed: int = 0) -> Path:
    """A LeRobot v2 folder of `episodes` 3-frame episodes, written by the real writer."""
    rng = np.random.default_rng(seed)
    writer = LeRobotV2Writer(path, fps=fps)
    for episode in range(episodes):
        images = rng.integers(0, 255, (3, size, size, 3), dtype=np.uint8)
        states = rng.normal(size=(3, 8)).astype(np.float32)
        actions = rng.normal(size=(3, 7)).astype(np.float32)
        writer.add_episode(images, images, states, actions, f"task {episode}")
    return writer.close()


def frame(height: int, width: int) -> Image.Image:
    return Image.new("RGB", (width, height), (1, 2, 3))


def saved_source(path: Path) -> Path:
    """A `save_to_disk` DatasetDict whose splits store states of different widths: 'train' 8-D and 'holdout'
    9-D in observation.state, and both a 6-D 'proprio' column (for a columns= override)."""
    def split(state_dim: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({
            AGENT_IMAGE: [frame(4, 4)] * 2, WRIST_IMAGE: [frame(4, 4)] * 2,
            STATE: [[0.0] * state_dim] * 2, "proprio": [[0.0] * 6] * 2, ACTION: [[0.0] * 7] * 2,
            INSTRUCTION: ["pick"] * 2, EPISODE_INDEX: [0, 1], FRAME_INDEX: [0, 0],
        }, features=datasets.Features({
            AGENT_IMAGE: datasets.Image(), WRIST_IMAGE: datasets.Image(), STATE: FLOAT32_LIST,
            "proprio": FLOAT32_LIST, ACTION: FLOAT32_LIST, INSTRUCTION: datasets.Value("string"),
            EPISODE_INDEX: INT64, FRAME_INDEX: INT64}))

    datasets.DatasetDict({"train": split(8), "holdout": split(9)}).save_to_disk(str(path))
    return path


def cameras(agent: list[Image.Image], wrist: list[Image.Image]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({AGENT_IMAGE: agent, WRIST_IMAGE: wrist},
                                      features=datasets.Features({AGENT_IMAGE: datasets.Image(),
                                                                  WRIST_IMAGE: datasets.Image()}))


@pytest.fixture(scope="module")
def lerobot_dir(tmp_path_factory) -> Path:
    return write_lerobot(tmp_path_factory.mktemp("mixture_units") / "source", 2)


# --- source_profile ------------------------------------------------------------------------------


def test_profile_reads_dims_and_fps_from_the_source_and_each_camera_shape_from_the_first_frame(lerobot_dir):
    # the first row decides, whatever the later rows hold; each camera keeps its own shape
    table = cameras([frame(12, 16), frame(5, 5)], [frame(6, 10), frame(5, 5)])
    assert source_profile(str(lerobot_dir), table) == {
        "state_dim": 8, "action_dim": 7, "fps": 20,
        f"{AGENT_IMAGE} shape": (12, 16, 3), f"{WRIST_IMAGE} shape": (6, 10, 3)}
    stream = load_libero(str(lerobot_dir), streaming=True)
    assert source_profile(str(lerobot_dir), stream) == {
        "state_dim": 8, "action_dim": 7, "fps": 20,
        f"{AGENT_IMAGE} shape": (16, 16, 3), f"{WRIST_IMAGE} shape": (16, 16, 3)}


def test_profile_of_a_table_without_frames_has_no_camera_shapes(lerobot_dir):
    empty = cameras([frame(4, 4)], [frame(4, 4)]).select([])
    expected = {"state_dim": 8, "action_dim": 7, "fps": 20, f"{AGENT_IMAGE} shape": None, f"{WRIST_IMAGE} shape": None}
    assert source_profile(str(lerobot_dir), empty) == expected
    no_frames = cameras([frame(4, 4)], [frame(4, 4)]).to_iterable_dataset().filter(lambda row: False)
    assert source_profile(str(lerobot_dir), no_frames) == expected


def test_profile_follows_the_split_and_the_column_overrides(tmp_path):
    root = str(saved_source(tmp_path / "saved"))
    table = cameras([frame(4, 4)], [frame(4, 4)])
    shapes = {f"{AGENT_IMAGE} shape": (4, 4, 3), f"{WRIST_IMAGE} shape": (4, 4, 3)}
    # a saved dataset records no fps; the default split is 'train'
    assert source_profile(root, table) == {"state_dim": 8, "action_dim": 7, "fps": None, **shapes}
    assert source_profile(root, table, split="holdout")["state_dim"] == 9
    assert source_profile(root, table, columns={STATE: "proprio"})["state_dim"] == 6
    assert source_profile(root, table, split="holdout", columns={STATE: "proprio"})["state_dim"] == 6


def test_profile_of_a_hub_id_reads_the_given_cache(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--someone--libero"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_lerobot(repo / "snapshots" / commit, 1, fps=15, size=8)
    table = cameras([frame(8, 8)], [frame(8, 8)])
    assert source_profile("someone/libero", table, cache_dir=str(tmp_path / "hub")) == {
        "state_dim": 8, "action_dim": 7, "fps": 15, f"{AGENT_IMAGE} shape": (8, 8, 3),
        f"{WRIST_IMAGE} shape": (8, 8, 3)}


# --- check_compatible ----------------------------------------------------------------------------


def profile(**changes) -> dict:
    return {"state_dim": 8, "action_dim": 7, "fps": 20, f"{AGENT_IMAGE} shape": (16, 16, 3),
            f"{WRIST_IMAGE} shape": (16, 16, 3), **changes}


def test_an_unknown_fps_is_not_compared_but_every_other_unknown_is():
    check_compatible(["a", "b", "c"], [profile(), profile(fps=None), profile()])
    check_compatible(["a", "b"], [profile(fps=None), profile(fps=10)])
    with pytest.raises(ValueError) as error:
        check_compatible(["a", "b", "c"], [profile(), profile(fps=None), profile(**{f"{WRIST_IMAGE} shape": None})])
    assert str(error.value) == (f"data.source: a and c disagree on {WRIST_IMAGE} shape: (16, 16, 3) vs None; "
                                "sources trained together must record the same kind of frame")
    with pytest.raises(ValueError) as error:
        check_compatible(["a", "b"], [profile(), profile(action_dim=6)])
    assert str(error.value) == ("data.source: a and b disagree on action_dim: 7 vs 6; "
                                "sources trained together must record the same kind of frame")


# --- tag_source ----------------------------------------------------------------------------------


def test_tagging_a_table_shifts_episodes_adds_the_source_and_drops_task_indices():
    table = datasets.Dataset.from_dict({EPISODE_INDEX: [0, 0, 3], FRAME_INDEX: [0, 1, 0], TASK_INDEX: [5, 5, 6],
                                        INSTRUCTION: ["a", "a", "b"]})
    tagged = tag_source(table, 2, 10)
    assert tagged.column_names == [FRAME_INDEX, INSTRUCTION, EPISODE_INDEX, SOURCE_INDEX]
    assert tagged[EPISODE_INDEX] == [10, 10, 13] and tagged[SOURCE_INDEX] == [2, 2, 2]
    assert tagged[FRAME_INDEX] == [0, 1, 0] and tagged[INSTRUCTION] == ["a", "a", "b"]
    assert tagged.features[EPISODE_INDEX] == INT64 and tagged.features[SOURCE_INDEX] == INT64
    # a table without task indices is tagged the same way; int32 episodes become int64
    narrow = datasets.Dataset.from_dict({EPISODE_INDEX: [4], FRAME_INDEX: [7]}, features=datasets.Features(
        {EPISODE_INDEX: datasets.Value("int32"), FRAME_INDEX: INT64}))
    tagged = tag_source(narrow, 0, 0)
    assert tagged.column_names == [FRAME_INDEX, EPISODE_INDEX, SOURCE_INDEX] and tagged[EPISODE_INDEX] == [4]
    assert tagged.features == datasets.Features({FRAME_INDEX: INT64, EPISODE_INDEX: INT64, SOURCE_INDEX: INT64})


def test_tagged_episode_indices_are_shifted_in_integer_arithmetic():
    big = 2**53 + 1  # not a float64: shifting through floats would round it
    tagged = tag_source(datasets.Dataset.from_dict({EPISODE_INDEX: [big], FRAME_INDEX: [0]}), 1, 2)
    assert tagged[EPISODE_INDEX] == [big + 2]


def test_tagging_a_table_without_rows_keeps_the_integer_columns():
    table = datasets.Dataset.from_dict({EPISODE_INDEX: [1], FRAME_INDEX: [0], TASK_INDEX: [0]}).select([])
    tagged = tag_source(table, 1, 4)
    assert len(tagged) == 0
    assert tagged.features == datasets.Features({FRAME_INDEX: INT64, EPISODE_INDEX: INT64, SOURCE_INDEX: INT64})


def test_tagging_a_stream_shifts_episodes_in_place_and_declares_the_new_columns(lerobot_dir):
    stream = load_libero(str(lerobot_dir), streaming=True)
    assert TASK_INDEX in stream.column_names
    tagged = tag_source(stream, 2, 10)
    assert isinstance(tagged, datasets.IterableDataset)
    expected = {name: feature for name, feature in stream.features.items() if name != TASK_INDEX}
    assert tagged.features == datasets.Features({**expected, SOURCE_INDEX: INT64})
    assert tagged.column_names == [*expected, SOURCE_INDEX]  # the episode column keeps its place
    rows = list(tagged)
    assert [(row[EPISODE_INDEX], row[FRAME_INDEX], row[SOURCE_INDEX]) for row in rows] == [
        (10, 0, 2), (10, 1, 2), (10, 2, 2), (11, 0, 2), (11, 1, 2), (11, 2, 2)]
    assert all(TASK_INDEX not in row for row in rows)
    assert np.asarray(rows[0][AGENT_IMAGE]).shape == (16, 16, 3)  # the images are untouched


def test_tagging_a_stream_without_declared_features_gives_integers():
    rows = [{EPISODE_INDEX: 1, "x": 2.5}, {EPISODE_INDEX: 3, "x": 1.0}]
    stream = datasets.IterableDataset.from_generator(lambda: iter(rows))
    assert stream.features is None
    rows = list(tag_source(stream, 1, 5))
    assert rows == [{EPISODE_INDEX: 6, "x": 2.5, SOURCE_INDEX: 1}, {EPISODE_INDEX: 8, "x": 1.0, SOURCE_INDEX: 1}]
    assert all(type(row[EPISODE_INDEX]) is int and type(row[SOURCE_INDEX]) is int for row in rows)


# --- join_sources --------------------------------------------------------------------------------


def numeric_table(state, action, features: datasets.Features) -> datasets.Dataset:
    return datasets.Dataset.from_dict({STATE: state, ACTION: action}, features=features)


FIXED = datasets.Features({STATE: datasets.List(datasets.Value("float32"), length=2),
                           ACTION: datasets.List(datasets.Value("float32"), length=1)})
DOUBLE = datasets.Features({STATE: datasets.List(datasets.Value("float64")),
                            ACTION: datasets.List(datasets.Value("float64"))})


def test_joining_alike_tables_keeps_their_features():
    a = numeric_table([[1.0, 2.0]], [[3.0]], FIXED)
    b = numeric_table([[4.0, 5.0]], [[6.0]], FIXED)
    joined = join_sources([a, b])
    assert joined.features == FIXED and joined[STATE] == [[1.0, 2.0], [4.0, 5.0]] and joined[ACTION] == [[3.0], [6.0]]
    alone = join_sources([a])
    assert alone.features == FIXED and alone[STATE] == [[1.0, 2.0]]


def test_joining_tables_stored_differently_makes_float32_lists_of_both_columns():
    a = numeric_table([[1.0, 2.0]], [[3.0]], FIXED)
    b = numeric_table([[0.1, 0.2]], [[0.3]], DOUBLE)
    for tables in ([a, b], [b, a]):
        joined = join_sources(tables)
        assert joined.features == datasets.Features({STATE: FLOAT32_LIST, ACTION: FLOAT32_LIST})
    joined = join_sources([a, b])
    assert joined[STATE] == [[1.0, 2.0], np.float32([0.1, 0.2]).tolist()]
    assert joined[ACTION] == [[3.0], np.float32([0.3]).tolist()]


# --- SourceWeightedSampler -----------------------------------------------------------------------


def test_sampler_probabilities_give_each_source_its_share():
    sampler = SourceWeightedSampler(np.array([0, 0, 1]), [1.0, 3.0], seed=0)
    # source 0: 1/4 over its 2 samples; source 1: 3/4 on its single sample (one sample is not an empty source)
    assert sampler.probabilities.tolist() == [0.125, 0.125, 0.75] and len(sampler) == 3
    assert SourceWeightedSampler(np.array([1, 0, 0, 0]), [2, 2], seed=0).probabilities.tolist() == [0.5] + [0.5 / 3] * 3


@pytest.mark.parametrize("sources,weights,empty", [
    ([0, 0, 1], [1.0, 1.0, 1.0], 2),  # the last source, which bincount alone would not count
    ([0, 2, 2], [1.0, 1.0, 1.0], 1),
    ([1, 1], [1.0, 1.0, 1.0], 0),  # the first of several
])
def test_a_weighted_source_without_samples_is_named(sources, weights, empty):
    message = f"data.source_weights: source {empty} has no training samples"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        SourceWeightedSampler(np.array(sources), weights, seed=0)


def test_a_new_sampler_draws_epoch_zero():
    sources = np.repeat([0, 1], [30, 10])
    fresh = list(SourceWeightedSampler(sources, [1.0, 1.0], seed=5))
    sampler = SourceWeightedSampler(sources, [1.0, 1.0], seed=5)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == fresh != second
    assert len(fresh) == 40 and set(fresh) <= set(range(40))
