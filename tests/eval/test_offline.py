"""eval-offline: the val/* metrics of a saved policy on a dataset split, as a table and JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import synthetic_dataset, tiny_policy_config

from atlas_vla.cli import main as cli
from atlas_vla.data.config import DataConfig
from atlas_vla.data.normalization import compute_norm_stats
from atlas_vla.data.samples import LiberoSamples, build_samples, collate
from atlas_vla.data.split import load_train_val
from atlas_vla.eval.offline import POSITION_METRICS, VAL_METRICS, evaluate_offline, scored_samples
from atlas_vla.models.policy import AtlasPolicy



def _action_metrics(values):
    """(name, value) of the `VAL_METRICS` scored over action steps: this data says nowhere where things are."""
    return [(key, value) for key, value in zip(VAL_METRICS, values) if key not in POSITION_METRICS]

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    data = synthetic_dataset(root, num_episodes=8)
    train, val = load_train_val(DataConfig(source=str(data), val_fraction=0.25))
    torch.manual_seed(0)
    policy = AtlasPolicy(tiny_policy_config(), compute_norm_stats(train))
    return data, policy.save_pretrained(root / "policy"), policy, val


def _one_by_one(policy, samples):
    """Each sample's `VAL_METRICS` (rows), its real (unpadded) action steps, its actions and their valid mask."""
    policy.eval()
    metrics, steps, actions, valid = [], [], [], []
    with torch.no_grad():
        for index in range(len(samples)):
            batch = collate([samples[index]])
            out = policy(batch)
            metrics.append([float(out[key]) for key in VAL_METRICS])
            steps.append(int((~batch["actions_is_pad"]).sum()))
            actions.append(batch["actions"][0].numpy())
            valid.append(~batch["actions_is_pad"][0].numpy())
    return np.array(metrics), np.array(steps), actions, valid


def test_metrics_are_means_over_every_valid_step_whatever_the_batch_size(setup):
    data, checkpoint, policy, val = setup
    samples = LiberoSamples(val, policy.config.sample_spec)
    # the expectation, sample by sample: each sample's metrics weighted by its real (unpadded) action steps
    per_sample, steps, actions, valid = _one_by_one(policy, samples)
    expected = (per_sample * steps[:, None]).sum(0) / steps.sum()
    assert len(samples) % 4 != 0 and len(samples) % 3 != 0  # both batch sizes end with a short batch
    for batch_size in (4, 3):
        metrics = evaluate_offline(str(checkpoint), str(data), split="val", val_fraction=0.25, batch_size=batch_size)
        for key, value in zip(VAL_METRICS, expected):
            if key in POSITION_METRICS:  # the data says nowhere where things are: nothing scores the locate loss
                assert f"val/{key}" not in metrics
            else:
                assert metrics[f"val/{key}"] == pytest.approx(value, rel=1e-5), (batch_size, key)
    # the mean-action baseline, computed here from the actions alone
    real = np.stack(actions)[np.stack(valid)]  # (valid steps, 7)
    mean = np.asarray(policy.norm_stats.action.mean, dtype=np.float64)
    closed = mean[6] > 0  # the majority gripper command: the mean's sign
    error = mean[:6] - real[:, :6]
    assert metrics["val/baseline_pose_l1_error"] == pytest.approx(np.abs(error).mean(), rel=1e-5)
    assert metrics["val/baseline_pose_l2_error"] == pytest.approx(np.linalg.norm(error, axis=1).mean(), rel=1e-5)
    assert metrics["val/baseline_gripper_error"] == pytest.approx(np.mean((real[:, 6] > 0) != closed), rel=1e-5)


def test_a_limited_evaluation_scores_samples_spread_over_the_whole_split(setup):
    data, checkpoint, policy, val = setup
    samples = LiberoSamples(val, policy.config.sample_spec)
    per_sample, steps, _, _ = _one_by_one(policy, samples)
    episodes = [samples[index]["episode_index"] for index in range(len(samples))]
    # 2 batches of 3: six samples from the first to the last, not the first six (all from one episode)
    scored = np.linspace(0, len(samples) - 1, 6).round().astype(int)
    assert len(set(episodes[:6])) == 1 and {episodes[i] for i in scored} == set(episodes)
    expected = (per_sample[scored] * steps[scored, None]).sum(0) / steps[scored].sum()
    metrics = evaluate_offline(str(checkpoint), str(data), split="val", val_fraction=0.25, batch_size=3,
                               max_batches=2)
    for key, value in _action_metrics(expected):
        assert metrics[f"val/{key}"] == pytest.approx(value, rel=1e-5), key


def test_the_scored_part_of_a_split():
    part = scored_samples(list(range(100)), 10)
    assert [part[i] for i in range(len(part))] == list(range(0, 100, 11))
    spread = scored_samples(list(range(10)), 7)  # spaced 1.5 apart: rounded, every position once
    assert [spread[i] for i in range(len(spread))] == [0, 2, 3, 4, 6, 8, 9]
    whole = list(range(5))
    assert scored_samples(whole, None) is whole and scored_samples(whole, 5) is whole

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(100))

    stream = Stream()  # no length: scored as it comes (the loop stops after the limit)
    assert scored_samples(stream, 1) is stream


def test_command_table_json_and_errors(setup, tmp_path, capsys):
    data, checkpoint, _, _ = setup
    out = tmp_path / "m.json"
    assert cli(["eval-offline", "--checkpoint", str(checkpoint), "--data", str(data), "--val-fraction", "0.25",
                "--json", "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())["metrics"] and "val/pose_l1_error" in printed
    assert cli(["eval-offline", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "none")]) == 2
    assert f"data source {tmp_path / 'none'} does not exist" in capsys.readouterr().err
    assert cli(["eval-offline", "--checkpoint", str(tmp_path), "--data", str(data)]) == 2
    assert f"{tmp_path} is not an Atlas policy: config.json is missing" in capsys.readouterr().err


def test_the_policy_flag_and_a_runs_data_section(setup, tmp_path, capsys):
    from atlas_vla.config import TrainConfig, save_config

    data, checkpoint, _, _ = setup
    split = DataConfig(source=str(data), val_episodes=[0, 5])  # not what --val-fraction would draw
    run_config = save_config(TrainConfig(data=split), tmp_path / "run" / "config.yaml")
    assert cli(["eval-offline", "--policy", str(checkpoint), "--config", str(run_config), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == evaluate_offline(str(checkpoint), split)
    assert printed != evaluate_offline(str(checkpoint), str(data), val_fraction=0.25)


def test_several_sources_are_also_scored_one_by_one(setup, tmp_path):
    data, checkpoint, policy, _ = setup
    config = DataConfig(source=[str(data), str(synthetic_dataset(tmp_path, num_episodes=6))], val_fraction=0.25)
    _, val = load_train_val(config)
    samples = build_samples(val, policy.config.sample_spec, config)
    per_sample, steps, _, _ = _one_by_one(policy, samples)
    sources = np.array([samples[index]["source_index"] for index in range(len(samples))])
    assert set(sources.tolist()) == {0, 1}
    metrics = evaluate_offline(str(checkpoint), config, batch_size=4)
    for source in (0, 1):
        mine = sources == source
        expected = (per_sample[mine] * steps[mine, None]).sum(0) / steps[mine].sum()
        for key, value in _action_metrics(expected):
            assert metrics[f"val/source_{source}/{key}"] == pytest.approx(value, rel=1e-5), (source, key)
        assert f"val/source_{source}/baseline_pose_l1_error" in metrics
    whole = (per_sample * steps[:, None]).sum(0) / steps.sum()
    for key, value in _action_metrics(whole):
        assert metrics[f"val/{key}"] == pytest.approx(value, rel=1e-5), key
    # one source: no per-source keys
    assert not any("/source_" in key for key in evaluate_offline(str(checkpoint), str(data), val_fraction=0.25))
    # an empty split of several sources, and a limit of no batches, say what is wrong
    with pytest.raises(ValueError, match=r"the val split of .* is empty"):
        evaluate_offline(str(checkpoint), DataConfig(source=config.source, val_fraction=0.0))
    with pytest.raises(ValueError, match="max_batches must be >= 1 or None"):
        evaluate_offline(str(checkpoint), config, max_batches=0)
