"""The 7-D LIBERO action: which index means what, and the gripper convention.

An action is `[dx, dy, dz, droll, dpitch, dyaw, gripper]`: a 6-D end-effector pose delta
(position, then axis-angle rotation) and a gripper command, -1 open and +1 close. Every module that
slices an action or reads a gripper command uses these names, and every place that turns a
continuous gripper value (a logit, an ensembled mean, a 0/1 source value) into a command calls
`binarize_gripper`, so the rule "closed means > 0" is written once. A frame may also have no action at all
(`known_actions`: a rendered scene, which teaches only where things are).
"""

from __future__ import annotations

from typing import Callable, TypeVar

import numpy as np

from atlas_vla.constants import ACTION

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


def without_action(actions: np.ndarray) -> np.ndarray:
    """(N,) bool: the rows of `actions` (N, 7) that say "no action known", NaN in every dimension."""
    return np.isnan(actions).all(axis=1)


def known_actions(actions: np.ndarray, positions: np.ndarray | None, where: Callable[[int], str]) -> np.ndarray:
    """(N,) bool: which rows of `actions` (N, 7) are actions. A row that is NaN in every dimension says "no action
    known": a frame that only says where things are (`atlas-vla render-scenes` writes them), so it must say that,
    with a finite value in its row of `positions` (N, 6, `OBJECT_POSITIONS`). Any other non-finite value is corrupt
    data: `ValueError` naming the first such row (`where(row)`, e.g. "at episode 2, frame 3") and its value."""
    unknown = without_action(actions)
    located = np.isfinite(positions).any(axis=1) if positions is not None else np.zeros(len(actions), bool)
    bare = unknown & ~located
    bad = ~np.isfinite(actions) & ~(unknown & located)[:, None]
    if bad.any():
        row, dim = (int(i) for i in np.argwhere(bad)[0])
        hint = ("; a frame without an action (NaN in every dimension) must say where things are (object_positions)"
                if bare[row] else "; expected finite numbers, or NaN in every dimension for a frame without an action")
        raise ValueError(f"column {ACTION!r} holds a non-finite value ({actions[row, dim]}) {where(row)}, dimension "
                         f"{dim}{hint}")
    return ~unknown
