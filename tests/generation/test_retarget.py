"""The re-targeting controller's actions, by value: the planned step as LIBERO's controller carries it out, plus
a soft pull back onto the plan (the simulator runs them in test_generation.py)."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from atlas_vla.generation.retarget import FEEDBACK_GAIN, MOVE_PER_ACTION_M, POSITION_SCALE, Waypoint, action_towards


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
