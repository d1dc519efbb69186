"""The 7-D action layout and the one gripper rule, on torch tensors and numpy arrays alike."""

from __future__ import annotations

import numpy as np
import torch

from atlas_vla.action_layout import (
    ACTION_DIM,
    GRIPPER,
    GRIPPER_CLOSE,
    GRIPPER_OPEN,
    POSE,
    POSITION,
    ROTATION,
    binarize_gripper,
    gripper_closed,
)


def test_layout_covers_the_action_once():
    indices = list(range(ACTION_DIM))
    assert indices[POSITION] + indices[ROTATION] == indices[POSE] == [0, 1, 2, 3, 4, 5]
    assert indices[POSE] + [GRIPPER] == indices
    assert (GRIPPER_OPEN, GRIPPER_CLOSE) == (-1.0, 1.0)


def test_binarize_gripper_snaps_strictly_positive_to_close():
    values = [-2.0, -1e-6, 0.0, 1e-6, 0.7, 1.0]
    expected = [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]  # 0 is open: 0/1 sources read the same as -1/+1 ones
    snapped = binarize_gripper(torch.tensor(values, dtype=torch.float64))
    assert snapped.dtype == torch.float64 and snapped.tolist() == expected
    array = binarize_gripper(np.asarray(values, dtype=np.float32))
    assert array.dtype == np.float32 and array.tolist() == expected
    assert float(binarize_gripper(np.float64(0.2))) == 1.0
    # numpy keeps a float input's precision and turns integer (0/1) grippers into floats (uint8: float32)
    assert binarize_gripper(np.asarray([0.5, -0.5])).dtype == np.float64
    integers = binarize_gripper(np.asarray([1, 0], dtype=np.uint8))
    assert integers.dtype == np.float32 and integers.tolist() == [1.0, -1.0]
    assert gripper_closed(torch.tensor([0.0, 1.0])).tolist() == [False, True]
