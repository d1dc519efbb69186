"""Re-targeting one recorded pick-and-place to a new layout (MimicGen's idea, arXiv 2310.17596, for one grasp and
one placement).

A source episode is split, from its end-effector path and gripper commands, into object-centric segments:

- **reach and grasp** (from the step the hand is within `APPROACH_M` of where it closes the gripper, to the step
  the carry begins, once the hand has moved `CARRY_M` sideways from the grasp): fixed relative to the object the
  goal moves;
- **place** (from the step the hand comes within `PLACE_M` sideways of where it lets go, to the end): fixed relative
  to the goal's target.

The source's carry between the two is not replayed: carried to the new target's frame it would start where the
source's object stood relative to its target, and every generated carry would detour there first, a turn no object
marks. Each segment's end-effector poses are carried into the new poses' frames (`T_new @ inv(T_source) @ T_hand`),
where a round object (a bowl, a plate: `Scene.is_round`) keeps its source heading (`seen_pose`), joined to the
hand's start and to each other by straight moves that start and end at rest (`PACE_M` per step at most), and
executed by the same operational-space controller the source ran (LIBERO's delta pose actions), closed loop. Each
position action is the step the plan takes, over how far the hand moves per unit of action (`MOVE_PER_ACTION_M`,
measured on the recorded demonstrations), plus a soft pull (`FEEDBACK_GAIN`) back to where the hand should be now;
rotations point at the next waypoint (`ROTATION_GAIN`). Before the gripper closes or opens, the hand waits (up to
`SETTLE_STEPS`) until it is within `REACHED_M` of the waypoint. The episode is kept only when the goal holds in the
simulator.

The actions are the training targets, so they follow the plan as smoothly as a person's: aiming each action
straight at the next waypoint (a gain of 5) made them swing from step to step 2-3 times as much as the recorded ones,
and a policy trained on them fitted those episodes hardly better than held-out ones (docs/closed-loop.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from atlas_vla.scenes.scene import Pose

APPROACH_M = 0.05  # the reach-and-grasp segment starts this close (sideways) to the grasp
CARRY_M = 0.02  # the carry starts once the hand has moved this far sideways from the grasp
PLACE_M = 0.02  # the place segment starts this close (sideways) to where the hand lets go: the recorded ones are
# still at carrying height there, and lower the object from it
PACE_M = 0.01  # metres per step of the joining moves (the source's own top speed is about 0.01 m per step)
PACE_RAD = 0.05  # radians per step of the joining moves
EASED_PEAK = 1.5  # a smoothstep's fastest step over its mean
MOVE_PER_ACTION_M = 0.0118  # how far the hand moves in one step per unit of position action (LIBERO's controller)
FEEDBACK_GAIN = 1.0  # lag behind the plan -> position action (1 cm -> 0.2), in LIBERO's scale below
ROTATION_GAIN = 2.0  # rotation error to the next waypoint -> rotation action
POSITION_SCALE, ROTATION_SCALE = 0.05, 0.5  # LIBERO's delta pose actions: metres and radians per unit
# the controller's: a generation's tries all come from one (1: aimed at the next waypoint; 2: turned with round objects;
# 3: replayed the source's whole carry)
RETARGET_VERSION = 4
REACHED_M = 0.005
SETTLE_STEPS = 20
FINISH_STEPS = 30  # after the last waypoint: steps to wait for the goal, holding it


@dataclass(frozen=True)
class Waypoint:
    """Where the hand should be after a step, and the gripper command of that step (-1 open, +1 closed)."""

    position: np.ndarray
    rotation: Rotation
    gripper: float


@dataclass(frozen=True)
class Segments:
    """The source's steps: `approach` (the reach-and-grasp segment starts), `grasp` (the gripper closes), `carry`
    (the reach-and-grasp segment has ended), `place` (the place segment starts)."""

    approach: int
    grasp: int
    carry: int
    place: int


def as_matrix(pose: Pose) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_quat(pose.quaternion, scalar_first=True).as_matrix()
    matrix[:3, 3] = pose.position
    return matrix


def split(positions: np.ndarray, gripper: np.ndarray) -> Segments:
    """The segments of a source from its hand positions (T, 3) and gripper commands (T,); `ValueError` when it
    never closes the gripper, never carries what it grasped, or lets go and grasps again before it carries."""
    closing = np.flatnonzero(gripper > 0)
    if not len(closing):
        raise ValueError("the source never closes the gripper: nothing to re-target")
    grasp = int(closing[0])
    sideways = np.linalg.norm(positions[:, :2] - positions[grasp, :2], axis=1)
    carried = np.flatnonzero((np.arange(len(positions)) > grasp) & (sideways > CARRY_M))
    if not len(carried):
        raise ValueError("the source never carries what it grasped away from where it grasped it")
    far = np.flatnonzero((np.arange(len(positions)) < grasp) & (sideways > APPROACH_M))
    approach = int(far[-1]) + 1 if len(far) else 0
    carry = int(carried[0])
    if (gripper[grasp:carry + 1] < 0).any():
        raise ValueError(f"the source opens the gripper again between its grasp (step {grasp}) and its carry (step "
                         f"{carry}): a regrasp is not one grasp and one placement")
    opened = np.flatnonzero((np.arange(len(positions)) > carry) & (gripper < 0))
    release = positions[opened[0] if len(opened) else -1, :2]  # a source that never lets go: where it ends
    near = np.flatnonzero((np.arange(len(positions)) >= carry)
                          & (np.linalg.norm(positions[:, :2] - release, axis=1) <= PLACE_M))
    return Segments(approach, grasp, carry, int(near[0]))


def _moved(positions: np.ndarray, rotations: Rotation, transform: np.ndarray) -> tuple[np.ndarray, Rotation]:
    moved = positions @ transform[:3, :3].T + transform[:3, 3]
    return moved, Rotation.from_matrix(transform[:3, :3]) * rotations


def _join(start: tuple[np.ndarray, Rotation], end: tuple[np.ndarray, Rotation], gripper: float) -> list[Waypoint]:
    """A straight move from `start` (excluded) to `end` (included) that speeds up and slows down as a person's does
    (smoothstep), its fastest step `PACE_M` (`PACE_RAD`): at an even pace the arm ran on past the end, 3-4 cm where
    the next segment turned back."""
    distance = float(np.linalg.norm(end[0] - start[0]))
    angle = float((end[1] * start[1].inv()).magnitude())
    steps = max(1, int(np.ceil(EASED_PEAK * max(distance / PACE_M, angle / PACE_RAD))))
    slerp = Slerp([0.0, 1.0], Rotation.concatenate([start[1], end[1]]))
    even = np.arange(1, steps + 1) / steps
    return [Waypoint(start[0] + (end[0] - start[0]) * f, slerp([f])[0], gripper) for f in even * even * (3 - 2 * even)]


def seen_pose(new: Pose, source: Pose, round_object: bool) -> Pose:
    """The pose a segment fixed to an object is carried to: the object's `new` pose, or for a round one its new
    position at its `source` heading. How far a round object was turned shows in no camera: a grasp or a placement
    turned with it would swing the hand's heading and path round the object by an angle no policy can see (version
    2 did, and its generated episodes were fitted 4-5 times worse than recorded ones), and any heading grasps or
    places a round object alike."""
    return Pose(new.position, source.quaternion) if round_object else new


def plan(positions: np.ndarray, rotations: Rotation, gripper: np.ndarray, source_object: Pose, source_target: Pose,
         new_object: Pose, new_target: Pose, start: tuple[np.ndarray, Rotation]) -> list[Waypoint]:
    """The waypoints that re-target the source (hand positions (T, 3), rotations, gripper commands (T,), the goal's
    object and target where the source had them) to `new_object` and `new_target`, from the hand pose `start`."""
    segments = split(positions, gripper)
    reach = slice(segments.approach, segments.carry)
    place = slice(segments.place, len(positions))
    to_object = as_matrix(new_object) @ np.linalg.inv(as_matrix(source_object))
    to_target = as_matrix(new_target) @ np.linalg.inv(as_matrix(source_target))
    reach_positions, reach_rotations = _moved(positions[reach], rotations[reach], to_object)
    place_positions, place_rotations = _moved(positions[place], rotations[place], to_target)
    waypoints = _join(start, (reach_positions[0], reach_rotations[0]), float(gripper[segments.approach]))
    waypoints += [Waypoint(p, reach_rotations[i], float(g)) for i, (p, g) in
                  enumerate(zip(reach_positions, gripper[reach]))]
    waypoints += _join((reach_positions[-1], reach_rotations[-1]), (place_positions[0], place_rotations[0]),
                       float(gripper[segments.carry]))
    waypoints += [Waypoint(p, place_rotations[i], float(g)) for i, (p, g) in
                  enumerate(zip(place_positions, gripper[place]))]
    return waypoints


def action_towards(waypoint: Waypoint, planned: np.ndarray, position: np.ndarray, rotation: Rotation) -> np.ndarray:
    """The 7-D delta pose action for the step from `planned` (where the hand should be now) to `waypoint`, for the
    hand now at `position`, `rotation`: the planned move as the controller carries it out, plus a pull back onto
    the plan."""
    move = np.clip((waypoint.position - planned) / MOVE_PER_ACTION_M
                   + FEEDBACK_GAIN * (planned - position) / POSITION_SCALE, -1.0, 1.0)
    turn = np.clip(ROTATION_GAIN * (waypoint.rotation * rotation.inv()).as_rotvec() / ROTATION_SCALE, -1.0, 1.0)
    return np.concatenate([move, turn, [waypoint.gripper]]).astype(np.float32)


def hand_pose(observation: dict[str, Any]) -> tuple[np.ndarray, Rotation]:
    """The end effector's position and rotation in a raw LIBERO observation (its quaternion is x, y, z, w)."""
    return np.asarray(observation["robot0_eef_pos"], float), Rotation.from_quat(observation["robot0_eef_quat"])


def execute(step: Callable[[np.ndarray], dict[str, Any]], observation: dict[str, Any], waypoints: list[Waypoint],
            succeeded: Callable[[], bool], max_steps: int) -> tuple[bool, list[np.ndarray]]:
    """Drive the hand along `waypoints` (`step(action)` runs one and returns the next observation), stopping at the
    step after which `succeeded()`; returns whether it did within `max_steps`, and the actions executed."""
    actions: list[np.ndarray] = []
    planned = hand_pose(observation)[0]  # where the plan has the hand now

    def run(waypoint: Waypoint) -> bool:
        nonlocal observation, planned
        action = action_towards(waypoint, planned, *hand_pose(observation))
        observation = step(action)
        actions.append(action)
        planned = waypoint.position
        return succeeded() or len(actions) >= max_steps

    previous = None
    for waypoint in waypoints:
        if previous is not None and waypoint.gripper != previous.gripper:  # grasp or release where it was meant
            for _ in range(SETTLE_STEPS):
                if np.linalg.norm(hand_pose(observation)[0] - previous.position) < REACHED_M:
                    break
                if run(previous):
                    return succeeded(), actions
        if run(waypoint):
            return succeeded(), actions
        previous = waypoint
    for _ in range(FINISH_STEPS):
        if run(waypoints[-1]):
            break
    return succeeded(), actions
