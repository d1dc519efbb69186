"""NormStats by value on small hand-made tables: the exact messages users see, the stored form, the content
hash and the data fingerprint computed here independently, the comparison tolerances, and normalisation
bounds and devices."""

from __future__ import annotations

import hashlib
import json
import re

import datasets
import numpy as np
import pytest
import torch

from atlas_vla.constants import ACTION, EPISODE_INDEX, SOURCE_INDEX, STATE
from atlas_vla.data.normalization import (
    FeatureStats,
    NormStats,
    compute_norm_stats,
    data_fingerprint,
    normalize,
    unnormalize,
)

FIELDS = ["mean", "std", "min", "max", "q01", "q99"]


def sha16(*arrays: np.ndarray) -> str:
    """The fingerprint's documented recipe: per array its dtype and shape, then its bytes; 16 hex chars."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.dtype}{array.shape}".encode() + np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def feature(dim: int, offset: float = 0.0) -> dict[str, list[float]]:
    return {name: [offset + i + 0.25 * k for i in range(dim)] for k, name in enumerate(FIELDS)}


def stats_dict(**changes) -> dict:
    return {"fingerprint": "abc", "num_frames": 3, "action": feature(7), "state": feature(8, 10.0), **changes}


def table(actions, states, episodes, **extra) -> datasets.Dataset:
    return datasets.Dataset.from_dict({ACTION: actions, STATE: states, EPISODE_INDEX: episodes, **extra})


# --- FeatureStats / NormStats stored form ----------------------------------------------------------


def test_feature_stats_from_a_dict_are_float64_arrays():
    stats = FeatureStats.from_dict({name: [1, 2] for name in FIELDS})
    for name in FIELDS:
        value = getattr(stats, name)
        assert value.dtype == np.float64 and value.tolist() == [1.0, 2.0]


def test_feature_stats_errors_name_what_is_wrong():
    with pytest.raises(ValueError) as error:
        FeatureStats.from_dict({"mean": [0.0], "std": [1.0], "min": [0.0], "max": [1.0]})
    assert str(error.value) == ("stats: missing statistics ['q01', 'q99']; "
                                "expected ['mean', 'std', 'min', 'max', 'q01', 'q99']")
    with pytest.raises(ValueError) as error:  # one shape for all, but not 1-D
        FeatureStats.from_dict({name: [[0.0, 1.0]] for name in FIELDS}, where="there")
    assert str(error.value) == ("there: statistics must be 1-D arrays of one length, got shapes "
                                + str({name: (1, 2) for name in FIELDS}))
    lengths = {name: [0.0, 1.0] for name in FIELDS} | {"q99": [1.0]}
    with pytest.raises(ValueError) as error:
        FeatureStats.from_dict(lengths)
    assert str(error.value) == ("stats: statistics must be 1-D arrays of one length, got shapes "
                                + str({name: (2,) for name in FIELDS} | {"q99": (1,)}))


def test_norm_stats_dict_round_trip_and_sources_only_when_there_are_some():
    values = stats_dict()
    stats = NormStats.from_dict(values)
    assert stats.to_dict() == values and list(stats.to_dict()) == ["fingerprint", "num_frames", "action", "state"]
    sources = [{"source": "a", "num_frames": 3, "fingerprint": "f"}]
    with_sources = NormStats.from_dict({**values, "sources": sources})
    assert with_sources.sources == sources and with_sources.to_dict() == {**values, "sources": sources}


def test_per_source_rows_come_from_the_sources_or_name_the_one_source():
    one = NormStats.from_dict(stats_dict())
    assert one.per_source("data/demos") == [{"source": "data/demos", "num_frames": 3, "fingerprint": "abc"}]
    assert one.per_source() == [{"source": None, "num_frames": 3, "fingerprint": "abc"}]
    sources = [{"source": "a", "num_frames": 1, "fingerprint": "f"}, {"source": "b", "num_frames": 2, "fingerprint": "g"}]
    several = NormStats.from_dict({**stats_dict(), "sources": sources})
    rows = several.per_source("ignored")
    assert rows == sources
    rows[0]["source"] = "changed"  # copies: the statistics are not edited through them
    assert several.sources[0]["source"] == "a"


def test_norm_stats_errors_name_what_is_wrong():
    with pytest.raises(ValueError) as error:
        NormStats.from_dict({"fingerprint": "abc", "action": feature(7)})
    assert str(error.value) == ("stats: missing keys ['num_frames', 'state']; "
                                "expected fingerprint, num_frames, action, state")
    state = feature(8)
    del state["q99"]
    with pytest.raises(ValueError) as error:
        NormStats.from_dict(stats_dict(state=state))
    assert str(error.value) == ("stats: state: missing statistics ['q99']; "
                                "expected ['mean', 'std', 'min', 'max', 'q01', 'q99']")
    for action_dim, state_dim in ((7, 9), (6, 8)):  # either one off is refused
        with pytest.raises(ValueError) as error:
            NormStats.from_dict(stats_dict(action=feature(action_dim), state=feature(state_dim)), where="run")
        assert str(error.value) == (f"run: expected 7-D action and 8-D state statistics, "
                                    f"got {action_dim}-D and {state_dim}-D")


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError) as error:
        NormStats.load(missing)
    assert str(error.value) == f"normalisation statistics not found: {missing}"
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError) as error:
        NormStats.load(broken)
    assert str(error.value) == (f"{broken}: not valid JSON "
                                "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(stats_dict()))
    assert NormStats.load(good).to_dict() == stats_dict()


# --- content hash and fingerprint ------------------------------------------------------------------


def test_content_hash_is_sha256_of_the_count_fingerprint_and_every_value_in_float64():
    stats = NormStats.from_dict(stats_dict())
    digest = hashlib.sha256(b"3:abc")
    for name in ("action", "state"):
        for field in FIELDS:
            digest.update(np.asarray(stats_dict()[name][field], dtype=np.float64).tobytes())
    assert stats.content_hash() == digest.hexdigest()[:16]
    changed = stats_dict()
    changed["state"]["q01"][3] += 0.5
    assert NormStats.from_dict(changed).content_hash() != stats.content_hash()
    # the same numbers held as float32 (in memory) hash as their stored float64 copy
    values = np.arange(7, dtype=np.float32) / 4
    single = FeatureStats(*(values,) * 6)
    in_memory = NormStats(single, FeatureStats(*(np.arange(8, dtype=np.float32),) * 6), 3, "abc")
    assert in_memory.content_hash() == NormStats.from_dict(in_memory.to_dict()).content_hash()


def test_data_fingerprint_is_a_16_character_hash_of_dtypes_shapes_and_bytes():
    actions, states, episodes = np.ones((2, 7), np.float32), np.zeros((2, 8), np.float32), np.array([0, 1])
    assert data_fingerprint(actions, states, episodes) == sha16(actions, states, episodes)
    assert len(data_fingerprint(actions, states, episodes)) == 16


# --- compute_norm_stats --------------------------------------------------------------------------------


def test_statistics_of_a_single_frame():
    stats = compute_norm_stats(table([[1.0] * 7], [[2.0] * 8], [4]))
    assert stats.num_frames == 1 and stats.sources == []
    assert stats.action.mean.tolist() == [1.0] * 7 and stats.action.std.tolist() == [0.0] * 7
    assert stats.state.q01.tolist() == [2.0] * 8 and stats.state.q99.tolist() == [2.0] * 8


def test_statistics_are_taken_over_float32_frames_whatever_the_stored_precision():
    actions = [[0.1 * (i + 1)] * 7 for i in range(3)]  # stored as float64 lists, episodes as int32
    states = [[0.3 * (i + 1)] * 8 for i in range(3)]
    double = datasets.List(datasets.Value("float64"))
    features = datasets.Features({ACTION: double, STATE: double, EPISODE_INDEX: datasets.Value("int32")})
    dataset = datasets.Dataset.from_dict({ACTION: actions, STATE: states, EPISODE_INDEX: [2, 2, 5]}, features=features)
    stats = compute_norm_stats(dataset)
    a32, s32 = np.asarray(actions, np.float32), np.asarray(states, np.float32)
    assert stats.action.mean.tolist() == a32.astype(np.float64).mean(0).tolist()
    assert stats.state.max.tolist() == s32.astype(np.float64).max(0).tolist()
    assert stats.state.mean.tolist() == s32.astype(np.float64).mean(0).tolist()
    # the fingerprint hashes float32 frames and int64 episode indices, however they were stored
    assert stats.fingerprint == sha16(a32, s32, np.array([2, 2, 5], np.int64))


@pytest.mark.parametrize("stored", ["int64", "float64", "float32"])
def test_the_same_frames_give_the_same_statistics_and_fingerprint_however_they_are_stored(stored):
    actions = np.array([[-1, 0, 1, 2, 3, 4, 1], [1, 2, 3, 4, 5, 6, -1]])
    states = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]])
    values = datasets.List(datasets.Value(stored))
    dataset = datasets.Dataset.from_dict(
        {ACTION: actions.tolist(), STATE: states.tolist(), EPISODE_INDEX: [0, 0]},
        features=datasets.Features({ACTION: values, STATE: values, EPISODE_INDEX: datasets.Value("int64")}))
    stats = compute_norm_stats(dataset)
    assert stats.fingerprint == sha16(actions.astype(np.float32), states.astype(np.float32), np.array([0, 0]))
    assert stats.action.mean.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0]
    # two frames: the deviation is half their distance
    assert stats.state.std.tolist() == (np.abs(states[0] - states[1]) / 2).tolist()


def test_bad_tables_are_refused_with_exact_messages():
    with pytest.raises(ValueError) as error:
        compute_norm_stats(table([[0.0] * 7], [[0.0] * 8], [0]).select([]))
    assert str(error.value) == "cannot compute statistics of an empty dataset"
    for actions, states in (([[0.0] * 6], [[0.0] * 8]), ([[0.0] * 7], [[0.0] * 9])):
        with pytest.raises(ValueError) as error:
            compute_norm_stats(table(actions, states, [0]))
        assert str(error.value) == (f"expected actions (N, 7) and states (N, 8), got (1, {len(actions[0])}) "
                                    f"and (1, {len(states[0])})")


def test_a_joined_table_without_source_names_numbers_its_sources():
    actions, states = np.arange(21, dtype=np.float32).reshape(3, 7), np.arange(24, dtype=np.float32).reshape(3, 8)
    stats = compute_norm_stats(table(actions.tolist(), states.tolist(), [0, 1, 1], **{SOURCE_INDEX: [0, 1, 1]}))
    assert stats.sources == [
        {"source": "0", "num_frames": 1, "fingerprint": sha16(actions[:1], states[:1], np.array([0]))},
        {"source": "1", "num_frames": 2, "fingerprint": sha16(actions[1:], states[1:], np.array([1, 1]))},
    ]
    assert stats.fingerprint == sha16(actions, states, np.array([0, 1, 1]))


# --- check_matches ---------------------------------------------------------------------------------------


def test_check_matches_names_the_difference():
    expected = NormStats.from_dict(stats_dict())
    with pytest.raises(ValueError) as error:
        expected.check_matches(NormStats.from_dict(stats_dict(fingerprint="xyz", num_frames=9)))
    assert str(error.value) == "statistics come from other data: fingerprint xyz (frames 9) vs abc (frames 3) expected"
    changed = stats_dict()
    changed["action"]["std"][2] += 1.0
    with pytest.raises(ValueError) as error:
        expected.check_matches(NormStats.from_dict(changed))
    assert str(error.value) == "statistics: action.std differs from the expected values"
    with pytest.raises(ValueError) as error:
        expected.check_matches(NormStats.from_dict(changed), what="checkpoint statistics")
    assert str(error.value) == "checkpoint statistics: action.std differs from the expected values"


@pytest.mark.parametrize("relative,matches", [(5e-7, True), (5e-6, False), (5e-5, False)])
def test_check_matches_tolerates_a_relative_difference_of_one_in_a_million(relative, matches):
    base = stats_dict()
    base["state"]["mean"] = [1.0] * 8
    other = json.loads(json.dumps(base))
    other["state"]["mean"][0] = 1.0 + relative
    if matches:
        NormStats.from_dict(base).check_matches(NormStats.from_dict(other))
    else:
        message = "statistics: state.mean differs from the expected values"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            NormStats.from_dict(base).check_matches(NormStats.from_dict(other))


# --- normalize / unnormalize ------------------------------------------------------------------------------


def test_quantile_normalisation_clips_far_below_to_minus_one():
    stats = FeatureStats.compute(np.array([[0.0, 10.0], [4.0, 20.0]]))  # q01 0.04, q99 3.96 (dim 0)
    y = normalize(torch.tensor([[-1000.0, 10.1], [stats.q01[0], 15.0]], dtype=torch.float64), stats, "quantile")
    assert y[0, 0].item() == -1.0 and y[1, 0].item() == pytest.approx(-1.0)
    assert y[0, 1].item() == pytest.approx(2 * (10.1 - stats.q01[1]) / (stats.q99[1] - stats.q01[1]) - 1)


@pytest.mark.parametrize("function", [normalize, unnormalize])
def test_an_unknown_mode_is_named(function):
    stats = FeatureStats.compute(np.zeros((2, 3)))
    with pytest.raises(ValueError) as error:
        function(torch.zeros(1, 3), stats, "minmax")
    assert str(error.value) == "normalisation mode must be one of ('mean_std', 'quantile', 'none'), got 'minmax'"


@pytest.mark.parametrize("mode", ["mean_std", "quantile"])
@pytest.mark.parametrize("keep", [(), (1,)])
def test_normalisation_stays_on_the_inputs_device(mode, keep):
    stats = FeatureStats.compute(np.array([[0.0, 1.0, 2.0], [1.0, 3.0, 5.0]]))
    x = torch.zeros(4, 3, device="meta")  # a device other than the CPU, without needing an accelerator
    for function in (normalize, unnormalize):
        y = function(x, stats, mode, keep=keep)
        assert y.device == x.device and y.shape == (4, 3) and y.dtype == torch.float32
