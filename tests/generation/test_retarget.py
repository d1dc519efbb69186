"""The re-targeting controller, by value: its actions are the planned step as LIBERO's controller carries it out,
plus a soft pull back onto the plan; the lifted grasp joins the placement straight; a round object's segments move
with it without turning (the simulator runs them in test_generation.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from atlas_vla.generation.retarget import (FEEDBACK_GAIN, MOVE_PER_ACTION_M, PACE_M, POSITION_SCALE, Waypoint,
                                           action_towards, plan, seen_pose, split)
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


def _source() -> tuple[np.ndarray, Rotation, np.ndarray]:
    """A recorded pick-and-place: down onto the bowl at x 0.5 (steps 0-9), close (10), lift (10-19), carry
    sideways to the plate at x 0.7 (20-25), lower (30-35), open (36)."""
    x = np.concatenate([np.full(20, 0.5), [0.53, 0.56, 0.59, 0.62, 0.66, 0.69], np.full(14, 0.7)])
    z = np.concatenate([np.linspace(1.05, 0.95, 10), np.linspace(0.95, 1.10, 10), np.full(10, 1.10),
                        np.linspace(1.10, 0.98, 6), np.full(4, 0.98)])
    gripper = np.where((np.arange(40) >= 10) & (np.arange(40) < 36), 1.0, -1.0)
    return np.stack([x, np.zeros(40), z], axis=1), Rotation.from_rotvec(np.tile([np.pi, 0.0, 0.0], (40, 1))), gripper


UPRIGHT = tuple(yaw_quaternion(0.0))
SOURCE_BOWL, SOURCE_PLATE = Pose((0.5, 0.0, 0.9), UPRIGHT), Pose((0.7, 0.0, 0.9), UPRIGHT)


def test_the_lifted_grasp_joins_the_placement_straight_and_the_sources_carry_is_not_replayed():
    positions, rotations, gripper = _source()
    segments = split(positions, gripper)
    assert (segments.approach, segments.grasp, segments.carry, segments.place) == (0, 10, 20, 25)  # 0.69: 1 cm to go
    new_bowl, new_plate = Pose((0.6, 0.1, 0.9), UPRIGHT), Pose((0.45, -0.1, 0.9), UPRIGHT)  # the plate behind it now
    waypoints = plan(positions, rotations, gripper, SOURCE_BOWL, SOURCE_PLATE, new_bowl, new_plate,
                     (positions[0] + [0.1, 0.0, 0.0], rotations[0]))
    # the move from the start ends on the approach's first pose, which the reach segment then begins with
    first = [np.allclose(w.position, positions[0] + [0.1, 0.1, 0.0]) for w in waypoints].index(True) + 1
    reach = np.stack([w.position for w in waypoints[first:first + 20]])
    np.testing.assert_allclose(reach, positions[:20] + [0.1, 0.1, 0.0], atol=1e-12)
    place = np.stack([w.position for w in waypoints[-15:]])
    np.testing.assert_allclose(place, positions[25:] + [-0.25, -0.1, 0.0], atol=1e-12)
    join = np.stack([w.position for w in waypoints[first + 20:-15]])  # above the bowl straight to the placement
    lifted, placing = reach[-1], place[0]
    along = (join - lifted) @ (placing - lifted) / np.sum((placing - lifted) ** 2)
    np.testing.assert_allclose(join, lifted + along[:, None] * (placing - lifted), atol=1e-12)
    speed = np.diff(np.concatenate([[0.0], along, [1.0]])) * np.linalg.norm(placing - lifted)  # per step, to the end
    assert speed.max() <= PACE_M and speed.max() > 0.9 * PACE_M
    assert all(w.gripper == 1.0 for w in waypoints[first + 20:-15])
    assert speed[0] < 0.2 * PACE_M and speed[-2] < 0.2 * PACE_M and abs(speed[-1]) < 1e-12  # off and onto it at rest
    # it ends where the placement starts (x 0.44), not first out to where the source's carry, moved with the plate,
    # would start (x 0.28)
    assert 0.0 < along[0] and along[-1] == pytest.approx(1.0)


def test_a_round_objects_segments_move_with_it_and_keep_the_sources_heading_where_another_objects_turn():
    positions, rotations, gripper = _source()
    new_bowl = Pose((0.55, 0.1, 0.9), tuple(yaw_quaternion(0.6)))
    new_plate = Pose((0.6, -0.1, 0.9), tuple(yaw_quaternion(-0.6)))
    assert seen_pose(new_bowl, SOURCE_BOWL, round_object=True) == Pose(new_bowl.position, UPRIGHT)
    assert seen_pose(new_bowl, SOURCE_BOWL, round_object=False) == new_bowl
    start = (positions[0] + [0.0, 0.0, 0.1], rotations[0])
    place_start = split(positions, gripper).place

    def carried(round_object: bool) -> tuple[np.ndarray, Rotation]:
        bowl, plate = (seen_pose(new, source, round_object) for new, source in ((new_bowl, SOURCE_BOWL),
                                                                                (new_plate, SOURCE_PLATE)))
        waypoints = plan(positions, rotations, gripper, SOURCE_BOWL, SOURCE_PLATE, bowl, plate, start)
        place = waypoints[-(len(positions) - place_start):]  # the place segment ends the plan
        return np.stack([w.position for w in place]), Rotation.concatenate([w.rotation for w in place])

    place, turns = carried(round_object=True)
    np.testing.assert_allclose(place, positions[place_start:] + [-0.1, -0.1, 0.0], atol=1e-12)  # moved, not turned
    np.testing.assert_allclose((turns * rotations[place_start:].inv()).magnitude(), 0.0, atol=1e-9)
    place, turns = carried(round_object=False)  # a box turned by -0.6 rad: the placement turns with it about it
    offset = positions[place_start:, :2] - [0.7, 0.0]
    turn = np.array([[np.cos(-0.6), -np.sin(-0.6)], [np.sin(-0.6), np.cos(-0.6)]])
    np.testing.assert_allclose(place[:, :2], offset @ turn.T + [0.6, -0.1], atol=1e-9)
    np.testing.assert_allclose((turns * rotations[place_start:].inv()).magnitude(), 0.6, atol=1e-9)


def test_a_source_that_never_lets_go_places_where_it_ends_and_a_regrasp_is_refused():
    positions, _, gripper = _source()
    holding = np.where(np.arange(40) >= 10, 1.0, -1.0)  # still closed at its last step
    assert split(positions, holding).place == split(positions, gripper).place == 25  # its end stands where it let go
    regrasp = gripper.copy()
    regrasp[14:17] = -1.0  # opens and closes again while lifting
    with pytest.raises(ValueError, match=r"the source opens the gripper again between its grasp \(step 10\) and "
                                         r"its carry \(step 20\): a regrasp is not one grasp and one placement"):
        split(positions, regrasp)
