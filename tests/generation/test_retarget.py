"""The re-targeting controller, by value: its actions are the planned step as LIBERO's controller carries it out,
plus a soft pull back onto the plan, and a round object's segments move with it without turning (the simulator runs
them in test_generation.py)."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from atlas_vla.generation.retarget import (FEEDBACK_GAIN, MOVE_PER_ACTION_M, POSITION_SCALE, Waypoint, action_towards,
                                           plan, seen_pose, split)
from atlas_vla.scenes.scene import Pose, yaw_quaternion


def test_an_action_carries_out_the_planned_step_and_pulls_a_lagging_hand_back_onto_the_plan():
    upright = Rotation.identity()
    planned = np.array([0.1, 0.2, 1.0])
    step = np.array([0.005, -0.002, 0.0])  # half the joining moves' pace
    waypoint = Waypoint(planned + step, upright, 1.0)
    on_plan = action_towards(waypoint, planned, planned, upright)
    np.testing.assert_allclose(on_plan[:3], step / MOVE_PER_ACTION_M, rtol=1e-6)
    np.testing.assert_array_equal(on_plan[3:], [0.0, 0.0, 0.0, 1.0])
    behind = action_towards(waypoint, planned, planned - [0.01, 0.0, 0.0], upright)  # 1 cm short of the plan
    np.testing.assert_allclose(behind[:3] - on_plan[:3], [FEEDBACK_GAIN * 0.01 / POSITION_SCALE, 0.0, 0.0], rtol=1e-5)
    assert abs(behind[0] - on_plan[0] - 0.2) < 1e-6  # a gentle pull: 1 cm -> 0.2, where aiming at the waypoint gave 1
    far = action_towards(Waypoint(planned + [0.05, 0.0, 0.0], upright, -1.0), planned, planned, upright)
    assert far[0] == 1.0 and far[6] == -1.0  # clipped to LIBERO's range
    turned = action_towards(Waypoint(planned, Rotation.from_rotvec([0.0, 0.0, 0.1]), -1.0), planned, planned, upright)
    np.testing.assert_allclose(turned[3:6], [0.0, 0.0, 2.0 * 0.1 / 0.5], rtol=1e-5)


def test_a_round_objects_segments_move_with_it_and_keep_the_sources_heading_where_another_objects_turn():
    # a source: reach down to the bowl at x 0.5, close, lift, carry to the plate at x 0.7 and open
    steps = 40
    positions = np.stack([np.linspace(0.5, 0.7, steps), np.zeros(steps), np.full(steps, 0.95)], axis=1)
    positions[:10, 0] = 0.5
    gripper = np.where((np.arange(steps) >= 10) & (np.arange(steps) < 36), 1.0, -1.0)
    rotations = Rotation.from_rotvec(np.tile([np.pi, 0.0, 0.0], (steps, 1)))
    upright = tuple(yaw_quaternion(0.0))
    source_bowl, source_plate = Pose((0.5, 0.0, 0.9), upright), Pose((0.7, 0.0, 0.9), upright)
    new_bowl = Pose((0.55, 0.1, 0.9), tuple(yaw_quaternion(0.6)))
    new_plate = Pose((0.6, -0.1, 0.9), tuple(yaw_quaternion(-0.6)))
    assert seen_pose(new_bowl, source_bowl, round_object=True) == Pose(new_bowl.position, upright)
    assert seen_pose(new_bowl, source_bowl, round_object=False) == new_bowl
    start = (positions[0] + [0.0, 0.0, 0.1], rotations[0])
    segments = split(positions, gripper)

    def carried(round_object: bool) -> tuple[np.ndarray, Rotation]:
        bowl, plate = (seen_pose(new, source, round_object) for new, source in ((new_bowl, source_bowl),
                                                                                (new_plate, source_plate)))
        waypoints = plan(positions, rotations, gripper, source_bowl, source_plate, bowl, plate, start)
        place = waypoints[-(steps - segments.carry):]  # the carry-and-place segment ends the plan
        return np.stack([w.position for w in place]), Rotation.concatenate([w.rotation for w in place])

    place, turns = carried(round_object=True)
    np.testing.assert_allclose(place, positions[segments.carry:] + [-0.1, -0.1, 0.0], atol=1e-12)  # moved, not turned
    np.testing.assert_allclose((turns * rotations[segments.carry:].inv()).magnitude(), 0.0, atol=1e-9)
    place, turns = carried(round_object=False)  # a box turned by -0.6 rad: the placement turns with it about it
    offset = positions[segments.carry:, :2] - [0.7, 0.0]
    turn = np.array([[np.cos(-0.6), -np.sin(-0.6)], [np.sin(-0.6), np.cos(-0.6)]])
    np.testing.assert_allclose(place[:, :2], offset @ turn.T + [0.6, -0.1], atol=1e-9)
    np.testing.assert_allclose((turns * rotations[segments.carry:].inv()).magnitude(), 0.6, atol=1e-9)
