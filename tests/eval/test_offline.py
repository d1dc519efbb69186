"""eval-offline: the val/* metrics of a saved policy on a dataset split, as a table and JSON."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import synthetic_dataset, tiny_policy_config

from atlas_vla.cli import main as cli
from atlas_vla.data.config import DataConfig
from atlas_vla.data.normalization import compute_norm_stats
from atlas_vla.data.samples import LiberoSamples, collate
from atlas_vla.data.split import load_train_val
from atlas_vla.eval.offline import VAL_METRICS, evaluate_offline, metric_sums
from atlas_vla.models.policy import AtlasPolicy


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    data = synthetic_dataset(root, num_episodes=8)
    train, val = load_train_val(DataConfig(source=str(data), val_fraction=0.25))
    torch.manual_seed(0)
    policy = AtlasPolicy(tiny_policy_config(), compute_norm_stats(train))
    return data, policy.save_pretrained(root / "policy"), policy, val


def test_metrics_equal_the_policy_forward_on_the_split(setup):
    data, checkpoint, policy, val = setup
    metrics = evaluate_offline(str(checkpoint), str(data), split="val", val_fraction=0.25, batch_size=4)
    samples = LiberoSamples(val, policy.config.sample_spec)
    batches = [collate([samples[i] for i in range(s, min(s + 4, len(samples)))]) for s in range(0, len(samples), 4)]
    totals, count = metric_sums(policy.eval(), batches)
    for key, value in zip(VAL_METRICS, totals / count):
        assert metrics[f"val/{key}"] == pytest.approx(float(value), rel=1e-5)
    assert "val/baseline_pose_l1_error" in metrics


def test_command_table_json_and_errors(setup, tmp_path, capsys):
    data, checkpoint, _, _ = setup
    out = tmp_path / "m.json"
    assert cli(["eval-offline", "--checkpoint", str(checkpoint), "--data", str(data), "--val-fraction", "0.25",
                "--json", "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())["metrics"] and "val/pose_l1_error" in printed
    assert cli(["eval-offline", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "none")]) == 2
    assert cli(["eval-offline", "--checkpoint", str(tmp_path), "--data", str(data)]) == 2
    assert "not an Atlas policy" in capsys.readouterr().err


def test_the_policy_flag_and_a_runs_data_section(setup, tmp_path, capsys):
    from atlas_vla.config import TrainConfig, save_config

    data, checkpoint, _, _ = setup
    split = DataConfig(source=str(data), val_episodes=[0, 5])  # not what --val-fraction would draw
    run_config = save_config(TrainConfig(data=split), tmp_path / "run" / "config.yaml")
    assert cli(["eval-offline", "--policy", str(checkpoint), "--config", str(run_config), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == evaluate_offline(str(checkpoint), split)
    assert printed != evaluate_offline(str(checkpoint), str(data), val_fraction=0.25)
