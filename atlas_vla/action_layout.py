"""The 7-D LIBERO action: which index means what, and the gripper convention.

An action is `[dx, dy, dz, droll, dpitch, dyaw, gripper]`: a 6-D end-effector pose delta
(position, then axis-angle rotation) and a gripper command, -1 open and +1 close. Every module that
slices an action or reads a gripper command uses these names, and every place that turns a
continuous gripper value (a logit, an ensembled mean, a 0/1 source value) into a command calls
`binarize_gripper`, so the rule "closed means > 0" is written once.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

ACTION_DIM = 7
POSITION = slice(0, 3)  # dx, dy, dz
ROTATION = slice(3, 6)  # droll, dpitch, dyaw (axis-angle delta)
POSE = slice(0, 6)  # position + rotation
POSE_DIM = 6
GRIPPER = 6  # index of the gripper command
GRIPPER_OPEN = -1.0
GRIPPER_CLOSE = 1.0

Values = TypeVar("Values")


def gripper_closed(values: Values) -> Values:
    """Element-wise "is this a close command": `values > 0` (True/False, tensor or array).

    Strictly positive, so sources that store the gripper as 0 (open) / 1 (close) read the same.
    """
    return values > 0


def binarize_gripper(values: Values) -> Values:
    """Snap continuous gripper values (torch tensor or numpy array) to exactly `GRIPPER_CLOSE` / `GRIPPER_OPEN`."""
    if isinstance(values, np.ndarray) or np.isscalar(values):
        return np.where(gripper_closed(values), GRIPPER_CLOSE, GRIPPER_OPEN).astype(np.result_type(values, np.float32))
    import torch

    return torch.where(gripper_closed(values), GRIPPER_CLOSE, GRIPPER_OPEN).to(values.dtype)
