"""Where a generated episode's goal object and its target rest, frame by frame (`generate.object_positions`), read
from the try's record: no simulator."""

from __future__ import annotations

import numpy as np

from atlas_vla.generation.generate import object_positions
from atlas_vla.generation.sources import Recovered

Q = [1.0, 0.0, 0.0, 0.0]  # an upright orientation: only the positions matter here
RECOVERED = Recovered(0, {"bowl_1": [0.1, 0.2, 0.9, *Q], "bowl_2": [-0.1, 0.3, 0.9, *Q], "plate_1": [0.0, 0.0, 0.9, *Q]})
NAN3 = [np.nan] * 3


def actions(gripper: list[float]) -> np.ndarray:
    return np.concatenate((np.zeros((len(gripper), 6)), np.asarray(gripper)[:, None]), axis=1).astype(np.float32)


def test_the_goal_object_is_placed_until_the_gripper_first_closes_and_the_target_every_frame():
    record = {"goal_object": "bowl_2", "layout": {"settled": {"bowl_2": [0.05, -0.2, 0.91, *Q],
                                                               "plate_1": [0.2, 0.1, 0.9, *Q]}}}
    found = object_positions(record, "plate_1", RECOVERED, actions([-1, -1, -1, 1, 1, -1]))
    moved = [0.05, -0.2, 0.91, 0.2, 0.1, 0.9]
    np.testing.assert_allclose(found, np.array([moved] * 3 + [NAN3 + moved[3:]] * 3, np.float32))
    assert found.dtype == np.float32


def test_an_object_the_layout_left_rests_where_the_source_had_it_and_an_unknown_one_is_nan():
    record = {"goal_object": "bowl_1", "layout": {"settled": {"bowl_2": [0.05, -0.2, 0.91, *Q]}}}
    found = object_positions(record, "plate_1", RECOVERED, actions([-1, -1]))  # the gripper never closes
    np.testing.assert_allclose(found, [[0.1, 0.2, 0.9, 0.0, 0.0, 0.9]] * 2, rtol=1e-6)
    found = object_positions(record, "flat_stove_1", RECOVERED, actions([-1, 1]))  # a fixture: not among the poses
    np.testing.assert_allclose(found, [[0.1, 0.2, 0.9, *NAN3], NAN3 * 2], rtol=1e-6)
