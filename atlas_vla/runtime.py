"""The inference runtime: one action per control step from an Atlas policy, local or remote.

`PolicyRuntime` is what every control loop runs (the simulator evaluation, the policy server's
clients, a real robot): `reset()` at an episode start, then `select_action(observation) -> (7,)`
once per step (ACT's contract). It owns the two rules that turn single observations into model
queries and model chunks into single actions:

- `ObservationHistory`, the temporal context: the model inputs for a frame are that frame and
  `num_temporal_frames - 1` earlier frames `temporal_stride` steps apart, clamped to the episode's
  first frame, exactly as the training samples are built (`data/samples.py`). Every step's
  observation enters the history, also the steps on which no query is made.
- `ChunkSchedule`, the chunk schedule: open-loop `replan_steps`, or ACT temporal ensembling.

The model behind it is a `ChunkPredictor`: `LocalPolicy` (an `AtlasPolicy` in this process) or
`serving.client.RemotePolicy` (an `atlas-vla serve` server, which keeps one history per connection).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Mapping, Protocol

import numpy as np
import torch

from atlas_vla.action_layout import ACTION_DIM, GRIPPER, binarize_gripper
from atlas_vla.config import check_ensemble_decay
from atlas_vla.constants import INSTRUCTION, OBS_IMAGES, OBS_STATE
from atlas_vla.data.spec import SampleSpec
from atlas_vla.data.transforms import observation_to_sample

if TYPE_CHECKING:
    from atlas_vla.models.policy import AtlasPolicy


class ObservationHistory:
    """The frames of the current episode that the next model inputs need (the temporal-context rule).

    `add(observation)` records one step's observation (the layout of `constants.OBSERVATION_KEYS`);
    `model_inputs()` is the unbatched sample of the latest frame: `OBS_IMAGES` uint8 (S, 3, H, W) with
    the views of the latest frame first, then those of the frames `temporal_stride`, `2 * temporal_stride`
    ... steps back (the episode's first frame where the episode is shorter), `OBS_STATE` (8,) and
    `INSTRUCTION`, the same values the training sample of that frame holds.
    """

    def __init__(self, spec: SampleSpec) -> None:
        self.spec = spec
        self._views: deque[torch.Tensor] = deque(maxlen=1 + (spec.num_temporal_frames - 1) * spec.temporal_stride)
        self._first: torch.Tensor | None = None
        self._latest: dict[str, Any] | None = None

    def reset(self) -> None:
        """Forget the episode (call at every episode start)."""
        self._views.clear()
        self._first = self._latest = None

    def add(self, observation: Mapping[str, Any]) -> None:
        """Record one step; a malformed observation raises `ValueError` and leaves the history unchanged."""
        sample = observation_to_sample(observation, self.spec)
        self._views.appendleft(sample[OBS_IMAGES])  # newest first
        if self._first is None:
            self._first = sample[OBS_IMAGES]
        self._latest = sample

    def __len__(self) -> int:
        return len(self._views)

    def model_inputs(self) -> dict[str, Any]:
        """The latest frame's unbatched model inputs; `RuntimeError` before the first `add`."""
        if self._latest is None or self._first is None:
            raise RuntimeError("no observation in this episode yet: call add(observation) first")
        steps_back = range(0, self.spec.num_temporal_frames * self.spec.temporal_stride, self.spec.temporal_stride)
        # the deque holds exactly the frames the context can reach, so a step back past its end is a step
        # back past the episode start: the first frame (kept aside once the deque has dropped it)
        views = [self._views[step] if step < len(self._views) else self._first for step in steps_back]
        return {OBS_IMAGES: torch.cat(views, dim=0), OBS_STATE: self._latest[OBS_STATE],
                INSTRUCTION: self._latest[INSTRUCTION]}


def batch_inputs(inputs: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack unbatched model inputs (`ObservationHistory.model_inputs`) into one batch for the policy."""
    return {OBS_IMAGES: torch.stack([x[OBS_IMAGES] for x in inputs]),
            OBS_STATE: torch.stack([torch.as_tensor(x[OBS_STATE]) for x in inputs]),
            INSTRUCTION: [x[INSTRUCTION] for x in inputs]}


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


class ChunkPredictor(Protocol):
    """What `PolicyRuntime` drives: a model that keeps an episode's history and predicts action chunks."""

    spec: SampleSpec

    def reset(self) -> None:
        """A new episode starts: forget the history."""

    def observe(self, observation: Mapping[str, Any]) -> None:
        """Record a step on which no chunk is needed (only matters with temporal context)."""

    def predict_chunk(self, observation: Mapping[str, Any]) -> np.ndarray:
        """Record a step and return the (action_horizon, 7) chunk for it, in LIBERO units."""


class LocalPolicy:
    """A `ChunkPredictor` over an `AtlasPolicy` in this process (one history: one episode at a time)."""

    def __init__(self, policy: "AtlasPolicy") -> None:
        self.policy = policy.eval()
        self.spec = policy.config.sample_spec
        self.history = ObservationHistory(self.spec)

    def reset(self) -> None:
        self.history.reset()

    def observe(self, observation: Mapping[str, Any]) -> None:
        self.history.add(observation)

    def predict_chunk(self, observation: Mapping[str, Any]) -> np.ndarray:
        self.history.add(observation)
        chunk = self.policy.predict_action_chunk(batch_inputs([self.history.model_inputs()]))
        return chunk[0].cpu().numpy().astype(np.float64)


class PolicyRuntime:
    """`reset()` at an episode start, `select_action(observation) -> (7,)` at every control step.

    `policy` is an `AtlasPolicy` (run here) or any `ChunkPredictor` (e.g. `RemotePolicy` for a server).
    Chunks run open-loop for `replan_steps` actions (None: the whole chunk), or, with `ensemble_decay`,
    the policy is asked every step and overlapping chunks are averaged (`ChunkSchedule`). Observations
    are upright (H, W, 3) uint8 `agentview_image` / `wrist_image`, the 8-D `state` and the
    `task_description`; actions are in LIBERO units with the gripper exactly -1 (open) or +1 (close).
    """

    def __init__(self, policy: "AtlasPolicy | ChunkPredictor", *, replan_steps: int | None = None,
                 ensemble_decay: float | None = None) -> None:
        from atlas_vla.models.policy import AtlasPolicy

        self.predictor: ChunkPredictor = LocalPolicy(policy) if isinstance(policy, AtlasPolicy) else policy
        self.schedule = ChunkSchedule(replan_steps, ensemble_decay)
        # without temporal context a step with no query needs no record (a remote one would cost a round trip)
        self._record_every_step = self.predictor.spec.num_temporal_frames > 1
        self.step = 0

    def reset(self) -> None:
        """A new episode: forget the observation history and any planned actions."""
        self.predictor.reset()
        self.schedule.reset()
        self.step = 0

    def select_action(self, observation: Mapping[str, Any]) -> np.ndarray:
        """The (7,) float64 action for this step's observation."""
        if self.schedule.needs_query(self.step):
            self.schedule.add(self.step, self.predictor.predict_chunk(observation))
        elif self._record_every_step:
            self.predictor.observe(observation)
        action = self.schedule.action(self.step)
        self.step += 1
        return action
