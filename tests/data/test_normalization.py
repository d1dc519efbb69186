"""Normalisation statistics: NumPy reference on real data, round trips, inverse pairs, mismatch refusal."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from atlas_vla.cli import main as cli
from atlas_vla.constants import ACTION, EPISODE_INDEX, STATE
from atlas_vla.data.config import DataConfig
from atlas_vla.data.normalization import FeatureStats, NormStats, compute_norm_stats, normalize, unnormalize
from atlas_vla.data.sources import load_libero
from atlas_vla.data.split import load_train_val


@pytest.fixture(scope="module")
def sim_demos(sim_demos_dir):
    return load_libero(str(sim_demos_dir))


def test_stats_match_numpy_reference_on_real_demos(sim_demos, sim_demos_dir):
    stats = compute_norm_stats(sim_demos)
    files = sorted((sim_demos_dir / "data").glob("chunk-*/*.parquet"))
    actions = np.concatenate([np.stack(pq.read_table(f, columns=["actions"])["actions"].to_pylist()) for f in files])
    states = np.concatenate([np.stack(pq.read_table(f, columns=["state"])["state"].to_pylist()) for f in files])
    assert stats.num_frames == len(actions) == 7056
    np.testing.assert_allclose(stats.action.mean, actions.astype(np.float64).mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.action.std, actions.astype(np.float64).std(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.state.q01, np.quantile(states.astype(np.float64), 0.01, axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.state.q99, np.quantile(states.astype(np.float64), 0.99, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(stats.action.min[6:], [-1.0])  # gripper is binary
    np.testing.assert_array_equal(stats.action.max[6:], [1.0])


def test_fingerprint_follows_the_frames(sim_demos):
    a = compute_norm_stats(sim_demos)
    b = compute_norm_stats(sim_demos.select(range(len(sim_demos))))
    c = compute_norm_stats(sim_demos.select(range(100)))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    a.check_matches(b)
    with pytest.raises(ValueError, match="come from other data"):
        a.check_matches(c)


def test_save_load_round_trip_and_errors(tmp_path, sim_demos):
    stats = compute_norm_stats(sim_demos.select(range(300)))
    path = stats.save(tmp_path / "sub" / "stats.json")
    loaded = NormStats.load(path)
    loaded.check_matches(stats)
    assert loaded.num_frames == 300 and not list(path.parent.glob("*.tmp"))
    with pytest.raises(FileNotFoundError):
        NormStats.load(tmp_path / "missing.json")
    broken = stats.to_dict()
    del broken["action"]["q99"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"broken.json: action: missing statistics \['q99'\]"):
        NormStats.load(tmp_path / "broken.json")
    tampered = stats.to_dict()
    tampered["state"]["mean"][0] += 1.0
    with pytest.raises(ValueError, match="state.mean differs"):
        stats.check_matches(NormStats.from_dict(tampered))


def make_stats() -> FeatureStats:
    values = np.array([[0.0, 10.0, -1.0], [2.0, 30.0, 1.0], [4.0, 20.0, 1.0]])
    return FeatureStats.compute(values)


@pytest.mark.parametrize("mode", ["mean_std", "quantile", "none"])
def test_normalize_unnormalize_are_inverse_and_keep_dims(mode):
    stats = make_stats()
    x = torch.tensor([[1.0, 15.0, -1.0], [3.0, 25.0, 1.0]])
    y = normalize(x, stats, mode, keep=(2,))
    torch.testing.assert_close(y[:, 2], x[:, 2])
    torch.testing.assert_close(unnormalize(y, stats, mode, keep=(2,)), x)


def test_normalize_by_value():
    stats = make_stats()  # dim 0: mean 2, std sqrt(8/3)
    y = normalize(torch.tensor([[4.0, 20.0, 0.0]]), stats, "mean_std")
    assert y[0, 0].item() == pytest.approx(2 / np.sqrt(8 / 3))
    assert y[0, 1].item() == pytest.approx(0.0)
    q = normalize(torch.tensor([[stats.q99[0], 1000.0, 0.0]]), stats, "quantile")
    assert q[0, 0].item() == pytest.approx(1.0) and q[0, 1].item() == 1.0  # clipped
    with pytest.raises(ValueError, match="normalisation mode"):
        normalize(torch.zeros(1, 3), stats, "minmax")


def test_bad_data_is_named():
    rows = {ACTION: [[0.0] * 7, [np.nan] + [0.0] * 6], STATE: [[0.0] * 8] * 2, EPISODE_INDEX: [4, 5]}
    with pytest.raises(ValueError, match=r"column 'action' holds a non-finite value \(nan\) at row 1 \(episode 5\)"):
        compute_norm_stats(datasets.Dataset.from_dict(rows))
    with pytest.raises(ValueError, match="column 'observation.state' missing"):
        compute_norm_stats(datasets.Dataset.from_dict({ACTION: [[0.0] * 7], EPISODE_INDEX: [0]}))


def test_compute_stats_command(tmp_path, sim_demos_dir, capsys):
    out = tmp_path / "stats.json"
    assert cli(["compute-stats", str(sim_demos_dir), "--output", str(out), "--val-fraction", "0.1"]) == 0
    stats = NormStats.load(out)
    train, _ = load_train_val(DataConfig(source=str(sim_demos_dir), val_fraction=0.1))
    assert stats.num_frames == len(train) < 7056  # the training split's frames, exactly
    assert stats.fingerprint in capsys.readouterr().out
    assert cli(["compute-stats", str(tmp_path / "nowhere"), "--output", str(tmp_path / "other.json")]) == 2
    assert f"data source {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "other.json").exists()


def test_compute_stats_uses_a_runs_data_section(tmp_path, sim_demos_dir, capsys):
    from atlas_vla.config import TrainConfig, save_config
    from atlas_vla.data.config import DataConfig
    from atlas_vla.data.split import load_train_val

    data = DataConfig(source=str(sim_demos_dir), max_episodes=6, val_episodes=[1, 4])
    run_config = save_config(TrainConfig(data=data), tmp_path / "run" / "config.yaml")
    out = tmp_path / "stats.json"
    assert cli(["compute-stats", "--config", str(run_config), "--output", str(out)]) == 0
    expected = compute_norm_stats(load_train_val(data)[0])  # 4 episodes: max_episodes and the explicit split
    assert NormStats.load(out).fingerprint == expected.fingerprint
    assert cli(["compute-stats", "--output", str(out)]) == 2
    assert "a source (Hub dataset id or folder) or --config RUN.yaml" in capsys.readouterr().err
    streamed = save_config(TrainConfig(data=DataConfig(source=str(sim_demos_dir), streaming=True, max_episodes=6,
                                                       val_episodes=[1, 4])), tmp_path / "streamed.yaml")
    assert cli(["compute-stats", "--config", str(streamed), "--output", str(out)]) == 0  # the same frames, read whole
    assert NormStats.load(out).fingerprint == expected.fingerprint
