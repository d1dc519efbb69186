"""Live observations as model inputs: the temporal-context rule of a control loop.

`ObservationHistory` keeps the frames of the current episode that the next model query needs: the
inputs for a frame are that frame and `num_temporal_frames - 1` earlier frames `temporal_stride` steps
apart, clamped to the episode's first frame, exactly as the training samples are built
(`data/samples.py`). The runtime, the policy server and `AtlasPolicy.predict_action` all go through it.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Mapping

import torch

from atlas_vla.constants import INSTRUCTION, OBS_IMAGES, OBS_STATE
from atlas_vla.data.spec import SampleSpec
from atlas_vla.data.transforms import observation_to_sample


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
