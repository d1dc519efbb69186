"""Failure reasons read from the simulator's object poses, on real LIBERO rollouts whose outcome is forced:
the recorded demonstration of libero_spatial task 0 replayed, then changed at the moment the bowl is held."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import HAS_SIM

from atlas_vla.action_layout import GRIPPER, GRIPPER_CLOSE, GRIPPER_OPEN, gripper_closed
from atlas_vla.data.spec import SampleSpec
from atlas_vla.eval import failures
from atlas_vla.eval import libero_sim as sim
from atlas_vla.runtime import PolicyRuntime

os.environ.setdefault("MUJOCO_GL", "egl")
pytestmark = [pytest.mark.skipif(not HAS_SIM, reason="the LIBERO simulator ([sim] extra) is not installed"),
              pytest.mark.sim, pytest.mark.slow]


class ScriptedPolicy:
    """A `ChunkPredictor` that plays `actions` one per query; `on_step(step)` may reach into the simulator
    before an action."""

    spec = SampleSpec()

    def __init__(self, actions: np.ndarray, on_step=None) -> None:
        self.actions, self.on_step, self.t = actions, on_step, 0

    def reset(self) -> None:
        self.t = 0

    def observe(self, observation):
        raise AssertionError("one action per query: every step queries")

    def predict_chunk(self, observation):
        if self.on_step is not None:
            self.on_step(self.t)
        action = self.actions[min(self.t, len(self.actions) - 1)]
        self.t += 1
        return action[None]


@pytest.fixture(scope="module")
def demo(sim_demos_dir):
    """Episode 0 of sim_demos (task 0, initial state 0), its environment, and the step at which the
    bowl is well off the table in the gripper (25 steps after the gripper first closes)."""
    table = pq.read_table(sim_demos_dir / "data" / "chunk-000" / "episode_000000.parquet")
    actions = np.stack(table["actions"].to_pylist()).astype(np.float64)
    instruction, bddl, init_states = sim.task_info("libero_spatial", 0)
    env = sim.make_env(bddl, 128)
    held_step = int(np.argmax(gripper_closed(actions[:, GRIPPER]))) + 25
    yield env, actions, init_states[0], instruction, held_step
    env.close()


def rollout(demo, actions, max_steps, on_step=None):
    env, _, init_state, instruction, _ = demo
    runtime = PolicyRuntime(ScriptedPolicy(actions, on_step), replan_steps=1)
    return sim.run_episode(env, runtime, init_state, instruction, max_steps=max_steps)


def hold_then(actions: np.ndarray, step: int, gripper: float, extra: int = 30) -> np.ndarray:
    """The demonstration up to `step`, then the arm holds still with this gripper command."""
    still = np.zeros((extra, actions.shape[1]))
    still[:, GRIPPER] = gripper
    return np.concatenate([actions[:step], still])


def test_the_demonstration_succeeds_and_has_no_failure_reason(demo):
    _, actions, *_ = demo
    assert rollout(demo, actions, len(actions) + 20)[0::2] == (True, None)


def test_a_gripper_that_never_closes_is_no_grasp(demo):
    _, actions, *_ = demo
    never_closes = actions.copy()
    never_closes[:, GRIPPER] = GRIPPER_OPEN
    assert rollout(demo, never_closes, len(actions)) == (False, len(actions), failures.NO_GRASP)


def test_still_holding_the_bowl_when_time_runs_out(demo):
    _, actions, _, _, held = demo
    assert rollout(demo, hold_then(actions, held, GRIPPER_CLOSE), held + 30)[2] == failures.TIMED_OUT_HOLDING


def test_opening_the_gripper_away_from_the_plate_is_not_placed(demo):
    _, actions, _, _, held = demo
    assert rollout(demo, hold_then(actions, held, GRIPPER_OPEN), held + 30)[2] == failures.NOT_PLACED


def test_a_bowl_knocked_out_of_the_closed_gripper_is_grasp_lost(demo):
    """The bowl is put back on the table 10 cm further from the plate while the gripper stays closed."""
    env, actions, _, _, held = demo
    problem = env.env
    joint = problem.objects_dict["akita_black_bowl_1"].joints[-1]

    def knock_away(step: int) -> None:
        if step == held:
            qpos = problem.sim.data.get_joint_qpos(joint).copy()
            qpos[0] -= 0.10  # the plate is on the +x side
            qpos[2] -= 0.10
            problem.sim.data.set_joint_qpos(joint, qpos)
            problem.sim.forward()

    assert rollout(demo, hold_then(actions, held, GRIPPER_CLOSE), held + 30, knock_away)[2] == failures.GRASP_LOST
