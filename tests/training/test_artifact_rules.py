"""The rules of the W&B `best` alias without a run: which metric it follows, which way is better, and how
checkpoints are compared (the artifacts themselves are checked in `test_artifacts.py`)."""

from __future__ import annotations

import math

import pytest

from atlas_vla.config import WandbConfig, config_from_args
from atlas_vla.training.artifacts import ArtifactLog, best_metric, higher_is_better
from atlas_vla.wandb_artifacts import best_moves, success_rate_suite


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


@pytest.mark.parametrize("flags,message", [
    (["--wandb.best_metric", "pose_l1_error"],
     "wandb.best_metric: pose_l1_error is not a validation (val/...) or simulator (eval/...) metric, "
     "e.g. val/pose_l1_error or eval/success_rate"),
    (["--wandb.best_metric", "eval/libero_spatial/task_3"],
     "wandb.best_metric: eval/libero_spatial/task_3 is logged only by simulator evaluations during training: set "
     "eval.every_steps, or follow a val/... metric or a suite's success rate (which evaluations attached later "
     "measure)"),
    (["--wandb.best_metric", "eval/success_rate", "--wandb.log_model", "best"],
     "wandb.log_model: best logs a version only when the training run measures wandb.best_metric "
     "(eval/success_rate), and it runs no simulator evaluation: set eval.every_steps, or log_model: all "
     "(eval-watch's results then move best)")])
def test_a_best_metric_the_run_never_logs_is_refused(flags, message):
    with pytest.raises(ValueError) as raised:
        config_from_args(["--config", "configs/demo.yaml", *flags])
    assert str(raised.value) == f"configs/demo.yaml: {message}"


def test_a_suites_success_rate_may_be_left_to_evaluations_attached_later():
    for metric in ("eval/success_rate", "eval/libero_spatial_swap/success_rate"):
        config = config_from_args(["--config", "configs/demo.yaml", "--wandb.best_metric", metric,
                                   "--wandb.log_model", "all"])
        assert best_metric(config) == metric


@pytest.mark.parametrize("metric,suite", [
    ("eval/success_rate", "libero_object"), ("eval/libero_spatial_swap/success_rate", "libero_spatial_swap"),
    ("eval/libero_spatial/task_3", None), ("eval/failures/no_grasp", None), ("val/pose_l1_error", None),
    ("eval/a/b/success_rate", None), ("val/x/success_rate", None)])
def test_only_a_suites_success_rate_names_a_suite(metric, suite):
    assert success_rate_suite(metric, "libero_object") == suite


def _result(rate: float, states: list[int] = [30, 31], episodes: int = 10, suite: str = "libero_spatial") -> dict:
    return {"suite": suite, "initial_states": states, "episodes": episodes, "success_rate": rate}


def _version(step: int, *evaluations: dict, metric: str = "eval/success_rate") -> dict:
    return {"step": step, "metric": metric, "metric_suite": "libero_spatial", "files": {"model.safetensors": str(step)},
            "evaluations": list(evaluations)}


def test_an_attached_success_rate_moves_best_only_past_the_same_episodes_on_the_best_version():
    best = _version(2, _result(0.6), _result(0.8, states=[0, 1]))
    assert best_moves(_version(4), _result(0.7), best) == (
        True, "0.700 beats 0.600 of the best version (step 2) on libero_spatial")
    assert best_moves(_version(4), _result(0.6), best) == (
        False, "0.600 does not beat 0.600 of the best version (step 2) on libero_spatial")  # a tie keeps it
    assert best_moves(_version(4), _result(0.7, states=[0, 1]), best)[0] is False  # 0.8 there
    assert best_moves(_version(4), _result(0.9, states=[5, 6]), best) == (
        False, "the best version (step 2) was not evaluated on the same episodes (libero_spatial, initial states "
               "[5, 6], 10 episodes), so the rates are not compared")
    assert best_moves(_version(4), _result(0.9, episodes=20), best)[0] is False  # other tasks, same states
    assert best_moves(_version(4), _result(0.1), None) == (
        True, "no version was best yet; this one succeeded 0.100 on libero_spatial")
    assert best_moves(_version(2), _result(0.9), best) == (False, "this version is already best")


def test_the_latest_result_of_the_same_episodes_on_the_best_version_counts():
    trained = _version(2, {**_result(0.5), "step": 2})  # the training run's own evaluation of these weights
    assert best_moves(_version(4), _result(0.55), trained)[0] is True
    again = _version(2, {**_result(0.5), "step": 2}, _result(0.3))  # measured again since (attached), lower
    assert best_moves(_version(4), _result(0.4), again) == (
        True, "0.400 beats 0.300 of the best version (step 2) on libero_spatial")


def test_a_version_holds_only_the_training_evaluations_of_its_own_weights():
    from atlas_vla.training.artifacts import policy_metadata

    records = [{**_result(0.5), "step": 300, "results": "eval/step-300/results.json"},
               {**_result(0.2, suite="libero_spatial_swap"), "step": 300, "results": "eval/step-300/results.json"}]
    assert policy_metadata(300, {}, {}, records)["evaluations"] == records  # every suite, each on its own
    assert policy_metadata(400, {}, {}, records)["evaluations"] == []  # measured on step 300's weights, not these
    assert policy_metadata(400, {}, {}, None)["evaluations"] == []


def test_best_stays_where_the_run_follows_another_metric_or_suite():
    assert best_moves(_version(4, metric="val/pose_l1_error"), _result(1.0), None) == (
        False, "best follows val/pose_l1_error, not the success rate on libero_spatial")
    swap = _version(4, metric="eval/libero_spatial_swap/success_rate")
    assert best_moves(swap, _result(1.0), None) == (
        False, "best follows eval/libero_spatial_swap/success_rate on libero_spatial_swap, not the success rate on "
               "libero_spatial")
    assert best_moves(swap, _result(0.2, suite="libero_spatial_swap"), None)[0] is True


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
