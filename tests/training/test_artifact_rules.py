"""The rules of the W&B `best` alias without a run: which metric it follows, which way is better, and how
checkpoints are compared (the artifacts themselves are checked in `test_artifacts.py`)."""

from __future__ import annotations

import math

import pytest

from atlas_vla.config import WandbConfig, config_from_args
from atlas_vla.training.artifacts import ArtifactLog, best_metric, higher_is_better


@pytest.mark.parametrize("metric,higher", [
    ("eval/success_rate", True), ("eval/libero_spatial/success_rate", True), ("eval/libero_spatial/task_3", True),
    ("eval/failures/no_grasp", False), ("val/pose_l1_error", False), ("val/loss", False)])
def test_success_rates_grow_and_errors_shrink(metric, higher):
    assert higher_is_better(metric) is higher


def test_best_follows_success_with_simulator_evaluations_else_the_validation_error():
    demo = ["--config", "configs/demo.yaml"]
    assert best_metric(config_from_args(demo)) == "val/pose_l1_error"
    assert best_metric(config_from_args([*demo, "--eval.every_steps", "100"])) == "eval/success_rate"
    assert best_metric(config_from_args([*demo, "--wandb.best_metric", "val/loss"])) == "val/loss"


@pytest.mark.parametrize("metric,message", [
    ("pose_l1_error", "wandb.best_metric: pose_l1_error is not a validation (val/...) or simulator (eval/...) metric, "
                      "e.g. val/pose_l1_error or eval/success_rate"),
    ("eval/success_rate", "wandb.best_metric: eval/success_rate is logged only by simulator evaluations during "
                          "training: set eval.every_steps, or follow a val/... metric")])
def test_a_best_metric_the_run_never_logs_is_refused(metric, message):
    with pytest.raises(ValueError) as raised:
        config_from_args(["--config", "configs/demo.yaml", "--wandb.best_metric", metric])
    assert str(raised.value) == f"configs/demo.yaml: {message}"


def test_a_checkpoint_is_best_when_it_beats_every_earlier_one():
    errors = ArtifactLog(WandbConfig(), "abc", "val/pose_l1_error", {})
    assert not errors.consider({}) and errors.best is None  # nothing measured yet
    assert errors.consider({"val/pose_l1_error": 0.5}) and errors.best == 0.5
    assert not errors.consider({"val/pose_l1_error": 0.5})  # a tie is not better
    assert not errors.consider({"val/pose_l1_error": math.nan}) and errors.best == 0.5
    assert errors.consider({"val/pose_l1_error": 0.4}) and errors.best == 0.4
    successes = ArtifactLog(WandbConfig(), "abc", "eval/success_rate", {}, best=0.6)  # resumed with its best
    assert not successes.consider({"eval/success_rate": 0.55})
    assert successes.consider({"eval/success_rate": 0.65}) and successes.best == 0.65


def test_a_checkpoint_from_another_wandb_project_says_where_its_run_continues(caplog):
    from atlas_vla.training.run import _check_resumed_project

    def check(reference: str, *extra: str) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="atlas_vla.train"):
            _check_resumed_project(config_from_args(["--config", "configs/demo.yaml", "--resume_from_checkpoint",
                                                     reference, *extra]))
        return caplog.messages

    assert check("wandb:team/atlas-vla/atlas-checkpoint-x:latest") == []  # the config's project, any entity
    assert check("wandb:team/atlas-vla/atlas-checkpoint-x:latest", "--wandb.entity", "team") == []
    assert check("wandb:team/other/atlas-checkpoint-x:latest") == [
        "the checkpoint comes from the W&B project team/other but this run logs to (your default entity)/atlas-vla: "
        "its W&B run continues there (set --wandb.entity and --wandb.project to continue it where it was)"]
    assert len(check("wandb:team/atlas-vla/atlas-checkpoint-x:latest", "--wandb.entity", "me")) == 1
