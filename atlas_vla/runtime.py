"""The inference runtime: one action per control step from an Atlas policy, local or remote.

`PolicyRuntime` is what every control loop runs (the simulator evaluation, the policy server's
clients, a real robot): `reset()` at an episode start, then `select_action(observation) -> (7,)`
once per step (ACT's contract). It owns the two rules that turn single observations into model
queries and model chunks into single actions:

- `data.observations.ObservationHistory`, the temporal context (the model inputs for a frame are that
  frame and earlier ones, as in training). Every step's observation enters the history, also the
  steps on which no query is made.
- `chunk_schedule.ChunkSchedule`: open-loop `replan_steps`, or ACT temporal ensembling.

The model behind it is a `ChunkPredictor`: `LocalPolicy` (an `AtlasPolicy` in this process) or
`serving.client.RemotePolicy` (an `atlas-vla serve` server, which keeps one history per connection).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol

import numpy as np

from atlas_vla.chunk_schedule import ChunkSchedule
from atlas_vla.data.observations import ObservationHistory, batch_inputs
from atlas_vla.data.spec import SampleSpec

if TYPE_CHECKING:  # the runtime drives a policy without importing the model code (simulator workers, clients)
    from atlas_vla.models.policy import AtlasPolicy


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
        self.predictor: ChunkPredictor = policy if hasattr(policy, "predict_chunk") else LocalPolicy(policy)
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
