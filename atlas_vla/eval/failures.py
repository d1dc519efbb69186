"""Why a simulator episode failed: the phase it ended in, read from the object poses it reports.

A LIBERO goal such as `(On akita_black_bowl_1 plate_1)` names the object the robot must move. The
`FailureMonitor` follows that object's position against the end effector's, step by step, with the
gripper command that was executed:

- **held**: the gripper is commanded closed, the object is lifted more than `LIFT_M` above where it
  rested when the episode began, and it is within `REACH_M` of the end effector;
- once held, it stays held until the gripper opens (a **release**) or the object moves more than
  `SLIP_M` relative to the end effector while the gripper is still closed (a **slip**).

A failed episode then ended in one phase (`FAILURE_REASONS`):

- `no grasp`: the object was never held;
- `grasp lost`: it was held, then slipped out of the closed gripper and was not held again;
- `not placed`: it was held, then released where the goal does not hold;
- `timed out holding`: it was still held when the episode ran out of steps.

Goals without an object to carry (open a drawer, turn on a stove) end in `goal not reached`. With
several goals (libero_10), the first one that does not hold at the end decides.

An evaluation in which no episode ran at all (every one ended in an error) has no success rate:
`check_episodes_ran` raises `EvaluationFailed` for it.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from atlas_vla.action_layout import GRIPPER, gripper_closed

NO_GRASP = "no grasp"
GRASP_LOST = "grasp lost"
NOT_PLACED = "not placed"
TIMED_OUT_HOLDING = "timed out holding"
GOAL_NOT_REACHED = "goal not reached"
FAILURE_REASONS = (NO_GRASP, GRASP_LOST, NOT_PLACED, TIMED_OUT_HOLDING, GOAL_NOT_REACHED)

PLACE_PREDICATES = ("on", "in")  # goals whose first argument is an object the robot carries
LIFT_M = 0.02  # above its resting height: the object is off its support
REACH_M = 0.15  # object centre to end effector: a bowl held at its rim is ~0.06 m away
SLIP_M = 0.05  # movement relative to the end effector that means the object left the gripper (a bowl pressed
               # onto the plate shifts ~0.025 m in the fingers; one that falls drops far more)


class ObjectTracker:
    """Follows one object of a pick-and-place goal: is it held now, and how did it last stop being held?"""

    def __init__(self, name: str, observation: Mapping[str, np.ndarray]) -> None:
        self.name = name
        self.rest_height = float(observation[f"{name}_pos"][2])
        self.ever_held = False
        self.held = False
        self.grip_offset: np.ndarray | None = None  # object - end effector when the hold began
        self.last_loss: str | None = None  # GRASP_LOST or NOT_PLACED

    def observe(self, observation: Mapping[str, np.ndarray], gripper_command: float) -> None:
        """Update from the observation that followed an action with this gripper command."""
        offset = np.asarray(observation[f"{self.name}_pos"], float) - np.asarray(observation["robot0_eef_pos"], float)
        closed = bool(gripper_closed(gripper_command))
        if self.held:
            if not closed:
                self.held, self.last_loss = False, NOT_PLACED
            elif np.linalg.norm(offset - self.grip_offset) > SLIP_M:
                self.held, self.last_loss = False, GRASP_LOST
        elif (closed and np.linalg.norm(offset) < REACH_M
              and observation[f"{self.name}_pos"][2] - self.rest_height > LIFT_M):
            self.held = self.ever_held = True
            self.grip_offset = offset

    def phase(self) -> str:
        """The failure phase this object ended in."""
        if not self.ever_held:
            return NO_GRASP
        return TIMED_OUT_HOLDING if self.held else self.last_loss


class FailureMonitor:
    """Watches one episode's goal objects; `reason()` says why a failed episode failed.

    `env` is a LIBERO `OffScreenRenderEnv` right after its settling steps and `observation` the
    observation those steps returned; call `observe` after every policy step. `goals` (BDDL goal tuples) replaces
    the task's own, for an episode whose goal was re-targeted to another object.
    """

    def __init__(self, env: Any, observation: Mapping[str, np.ndarray],
                 goals: Sequence[Sequence[str]] | None = None) -> None:
        self.problem = env.env
        self.goals = [tuple(goal) for goal in (goals if goals is not None else self.problem.parsed_problem["goal_state"])]
        self.trackers = {goal[1]: ObjectTracker(goal[1], observation)
                         for goal in self.goals if goal[0].lower() in PLACE_PREDICATES}

    def observe(self, observation: Mapping[str, np.ndarray], action: np.ndarray) -> None:
        for tracker in self.trackers.values():
            tracker.observe(observation, float(action[GRIPPER]))

    def reason(self) -> str:
        """The phase of the first goal that does not hold now (call it when the episode has failed)."""
        from libero.libero.envs.predicates import eval_predicate_fn

        states = self.problem.object_states_dict
        for goal in self.goals:
            if not eval_predicate_fn(goal[0], *(states[name] for name in goal[1:])):
                tracker = self.trackers.get(goal[1]) if goal[0].lower() in PLACE_PREDICATES else None
                return tracker.phase() if tracker else GOAL_NOT_REACHED
        return GOAL_NOT_REACHED  # every goal holds at the end but the episode never reported success


class EvaluationFailed(RuntimeError):
    """No episode of an evaluation ran: a success rate of 0 would read as a policy that failed every task."""


def check_episodes_ran(results: Sequence[Any], details: str | os.PathLike) -> None:
    """`EvaluationFailed` when every episode (`libero_sim.EpisodeResult`) ended in an error (the simulator cannot render, every worker died
    mid-episode, ...), naming the first error and `details`, the results file that holds them all."""
    if results and all(result.error for result in results):
        first = results[0].error.splitlines()[0]
        raise EvaluationFailed(f"all {len(results)} episodes ended in an error (details in {details}); the first: "
                               f"{first}")
