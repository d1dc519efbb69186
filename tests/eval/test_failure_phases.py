"""The failure phases of one carried object (`failures.ObjectTracker`), from made-up pose sequences.

No simulator: each step is the observation LIBERO would report (the object's and the end effector's
positions) with the gripper command that led to it, so every threshold is checked on both of its sides.
`test_failures.py` checks the same phases on real simulator rollouts.
"""

from __future__ import annotations

import numpy as np
import pytest

from atlas_vla.eval import failures
from atlas_vla.eval.failures import ObjectTracker

OPEN, CLOSE = -1.0, 1.0
REST = np.zeros(3)  # where the bowl rests when the episode begins (at the origin, so the thresholds compare exactly)


def observation(bowl, eef) -> dict[str, np.ndarray]:
    return {"bowl_1_pos": np.asarray(bowl, float), "robot0_eef_pos": np.asarray(eef, float)}


def tracker() -> ObjectTracker:
    return ObjectTracker("bowl_1", observation(REST, REST + [0.0, 0.0, 0.3]))


def lifted(height: float, eef_offset=(0.0, 0.0, 0.05)) -> dict[str, np.ndarray]:
    """The bowl `height` above its rest, the end effector `eef_offset` from it."""
    bowl = REST + [0.0, 0.0, height]
    return observation(bowl, bowl + np.asarray(eef_offset))


def test_the_rest_height_is_read_from_the_first_observation():
    on_the_table = ObjectTracker("bowl_1", observation([0.1, 0.2, 0.9], [0.1, 0.2, 1.2]))
    assert on_the_table.rest_height == 0.9
    assert (on_the_table.held, on_the_table.ever_held, on_the_table.grip_offset, on_the_table.last_loss) == (
        False, False, None, None)
    on_the_table.observe(observation([0.1, 0.2, 0.9], [0.1, 0.2, 0.95]), CLOSE)  # closed around it, not lifted
    assert not on_the_table.held and on_the_table.phase() == failures.NO_GRASP
    on_the_table.observe(observation([0.1, 0.2, 0.95], [0.1, 0.2, 1.0]), CLOSE)  # 5 cm above its rest
    assert on_the_table.held and on_the_table.phase() == failures.TIMED_OUT_HOLDING


def test_a_closed_gripper_near_a_lifted_bowl_holds_it_until_time_runs_out():
    bowl = tracker()
    bowl.observe(lifted(0.05), CLOSE)
    assert bowl.held and bowl.ever_held
    np.testing.assert_allclose(bowl.grip_offset, [0.0, 0.0, -0.05])
    bowl.observe(lifted(0.10), CLOSE)  # carried: it moves with the end effector
    assert bowl.held and bowl.phase() == failures.TIMED_OUT_HOLDING


@pytest.mark.parametrize("step,gripper", [
    (lifted(failures.LIFT_M - 0.005), CLOSE),  # not lifted off its support
    (lifted(failures.LIFT_M), CLOSE),  # exactly at the lift threshold: still resting
    (lifted(0.05, (failures.REACH_M + 0.01, 0.0, 0.0)), CLOSE),  # lifted, but out of the gripper's reach
    (lifted(0.05, (failures.REACH_M, 0.0, 0.0)), CLOSE),  # exactly at the reach threshold
    (lifted(0.05), OPEN),  # an open gripper holds nothing
    (lifted(0.05), 0.0),  # nor does a zero command (0 is "open" for 0/1 grippers)
])
def test_what_is_not_a_grasp(step, gripper):
    bowl = tracker()
    bowl.observe(step, gripper)
    assert not bowl.held and not bowl.ever_held and bowl.phase() == failures.NO_GRASP


def test_just_inside_the_thresholds_is_a_grasp():
    bowl = tracker()
    bowl.observe(lifted(failures.LIFT_M + 0.001, (failures.REACH_M - 0.001, 0.0, 0.0)), CLOSE)
    assert bowl.held


def test_opening_the_gripper_releases_the_bowl_where_it_is_not_placed():
    bowl = tracker()
    bowl.observe(lifted(0.05), CLOSE)
    bowl.observe(lifted(0.05), OPEN)
    assert not bowl.held and bowl.ever_held
    assert bowl.last_loss == failures.NOT_PLACED and bowl.phase() == failures.NOT_PLACED


@pytest.mark.parametrize("shift,slipped", [
    (failures.SLIP_M + 0.01, True), (failures.SLIP_M, False), (failures.SLIP_M - 0.01, False)])
def test_a_bowl_that_moves_away_from_the_closed_gripper_slipped(shift, slipped):
    bowl = tracker()
    bowl.observe(lifted(0.05), CLOSE)
    held = lifted(0.05)  # the end effector stays, the bowl moves sideways in its fingers (pressed on the plate)
    bowl.observe(observation(held["bowl_1_pos"] + [shift, 0.0, 0.0], held["robot0_eef_pos"]), CLOSE)
    assert bowl.held is not slipped
    assert bowl.phase() == (failures.GRASP_LOST if slipped else failures.TIMED_OUT_HOLDING)


def test_a_second_grasp_after_a_slip_is_held_again_and_the_last_loss_decides():
    bowl = tracker()
    bowl.observe(lifted(0.05), CLOSE)
    bowl.observe(observation(REST + [0.2, 0.0, 0.0], REST + [0.0, 0.0, 0.10]), CLOSE)  # it fell out
    assert bowl.phase() == failures.GRASP_LOST
    bowl.observe(lifted(0.06, (0.0, 0.01, 0.04)), CLOSE)  # grasped again, with a new offset
    np.testing.assert_allclose(bowl.grip_offset, [0.0, -0.01, -0.04])
    assert bowl.phase() == failures.TIMED_OUT_HOLDING
    bowl.observe(lifted(0.06), OPEN)
    assert bowl.phase() == failures.NOT_PLACED


def test_an_episode_with_no_episode_that_ran_fails_and_one_that_ran_does_not():
    class Result:
        def __init__(self, error):
            self.error = error

    failures.check_episodes_ran([Result(None), Result("boom")], "r.json")  # one ran: a rate exists
    failures.check_episodes_ran([], "r.json")  # nothing asked, nothing failed
    with pytest.raises(failures.EvaluationFailed) as raised:
        failures.check_episodes_ran([Result("EGL failed\ntraceback"), Result("other")], "r.json")
    assert str(raised.value) == "all 2 episodes ended in an error (details in r.json); the first: EGL failed"
