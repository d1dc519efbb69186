"""The chunk schedule: how a policy's action chunks become one action per control step.

Open-loop chunks (`replan_steps`, openpi's name) or ACT's temporal ensembling (`ensemble_decay`). The
runtime (`runtime.PolicyRuntime`) runs it at every place a policy acts; the evaluation config checks
its settings with `check_ensemble_decay` when it is read.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from atlas_vla.action_layout import ACTION_DIM, GRIPPER, binarize_gripper


def check_ensemble_decay(decay: float | None, name: str = "ensemble_decay") -> None:
    """`ValueError` unless the temporal-ensembling decay is null (off) or >= 0."""
    if decay is not None and decay < 0:
        raise ValueError(f"{name} must be >= 0 or null, got {decay}")


class ChunkSchedule:
    """Turns the policy's action chunks into one action per control step.

    Open loop (default): a chunk is queried and its first `replan_steps` actions run before the next
    query. Temporal ensembling (`ensemble_decay`, ACT): the policy is queried every step and the
    action for step t is the weighted mean of every earlier chunk's prediction for t, the oldest
    weighted most (`exp(-ensemble_decay * i)`, i = 0 for the oldest); the gripper is then snapped
    back to -1 / +1. A chunk that predicts "close in 6 steps" is then honoured 6 steps later even if
    every newer chunk still hesitates.
    """

    def __init__(self, replan_steps: int | None = None, ensemble_decay: float | None = None) -> None:
        check_ensemble_decay(ensemble_decay)
        if replan_steps is not None and replan_steps < 1:
            raise ValueError(f"replan_steps must be >= 1 (or None for the whole chunk), got {replan_steps}")
        self.replan_steps, self.ensemble_decay = replan_steps, ensemble_decay
        self._plan: deque[np.ndarray] = deque()
        self._chunks: deque[tuple[int, np.ndarray]] = deque()

    def reset(self) -> None:
        self._plan.clear()
        self._chunks.clear()

    def needs_query(self, step: int) -> bool:
        return self.ensemble_decay is not None or not self._plan

    def add(self, step: int, chunk: np.ndarray) -> None:
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[1] != ACTION_DIM or not np.isfinite(chunk).all():
            raise ValueError(f"the policy returned actions of shape {chunk.shape} (or non-finite); "
                             f"expected (H, {ACTION_DIM})")
        if self.ensemble_decay is None:
            self._plan.extend(chunk[: self.replan_steps or len(chunk)])
        else:
            self._chunks.append((step, chunk))

    def action(self, step: int) -> np.ndarray:
        if self.ensemble_decay is None:
            return self._plan.popleft()
        while step - self._chunks[0][0] >= len(self._chunks[0][1]):  # chunks that no longer cover `step`
            self._chunks.popleft()
        predictions = np.stack([chunk[step - start] for start, chunk in self._chunks])  # oldest first
        weights = np.exp(-self.ensemble_decay * np.arange(len(predictions)))
        action = weights @ predictions / weights.sum()
        action[GRIPPER] = binarize_gripper(action[GRIPPER])
        return action
