"""Evaluation results without the simulator: how episodes add up to success rates and failure counts, and an
evaluation in which no episode ran."""

from __future__ import annotations

import pytest

from atlas_vla.eval import failures
from atlas_vla.eval import libero_sim as sim


def test_summary_counts_failure_phases_per_task_and_overall():
    results = [sim.EpisodeResult("libero_spatial", 0, 0, "x", True, 90, 1.0),
               sim.EpisodeResult("libero_spatial", 0, 1, "x", False, 220, 1.0, failure=failures.NO_GRASP),
               sim.EpisodeResult("libero_spatial", 1, 0, "y", False, 220, 1.0, failure=failures.NO_GRASP),
               sim.EpisodeResult("libero_spatial", 1, 1, "y", False, 220, 1.0, failure=failures.TIMED_OUT_HOLDING),
               sim.EpisodeResult("libero_spatial", 1, 2, "", False, 0, 0.0, error="worker died")]
    summary = sim.summarize(results)
    assert summary["failures"] == {"no grasp": 2, "timed out holding": 1}
    assert summary["tasks"][0]["failures"] == {"no grasp": 1}
    assert summary["tasks"][1]["failures"] == {"no grasp": 1, "timed out holding": 1}
    metrics = sim.eval_metrics("libero_spatial", summary)
    assert metrics["eval/success_rate"] == pytest.approx(1 / 5) and metrics["eval/libero_spatial/task_1"] == 0.0
    assert metrics["eval/failures/no_grasp"] == 2 and metrics["eval/failures/timed_out_holding"] == 1
    assert metrics["eval/failures/grasp_lost"] == 0 and metrics["eval/failures/not_placed"] == 0
    table = sim.format_table("libero_spatial", summary)
    assert "1 no grasp, 1 timed out holding" in table and "failures: 2 no grasp, 1 timed out holding" in table


def test_an_evaluation_in_which_no_episode_ran_is_a_failure_not_a_zero_rate(tmp_path):
    errors = [sim.EpisodeResult("libero_spatial", task, 0, "", False, 0, 0.0, error=f"RuntimeError: no GL {task}\nat")
              for task in (0, 1)]
    with pytest.raises(failures.EvaluationFailed, match=r"^all 2 episodes ended in an error \(details in "
                       + str(tmp_path / "r.json") + r"\); the first: RuntimeError: no GL 0$"):
        failures.check_episodes_ran(errors, tmp_path / "r.json")
    one_ran = [*errors, sim.EpisodeResult("libero_spatial", 2, 0, "x", False, 220, 1.0, failure=failures.NO_GRASP)]
    failures.check_episodes_ran(one_ran, tmp_path / "r.json")  # a failed episode is a result: 0 of 3 is a rate
    failures.check_episodes_ran([], tmp_path / "r.json")  # nothing asked, nothing failed
