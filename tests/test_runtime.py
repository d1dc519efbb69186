"""The inference runtime: the temporal-context rule equals the training samples' on a recorded episode,
the chunk schedule, and `select_action` step by step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_policy_config

from atlas_vla.chunk_schedule import ChunkSchedule
from atlas_vla.constants import AGENT_IMAGE, INSTRUCTION, OBS_IMAGES, OBS_STATE, STATE, WRIST_IMAGE
from atlas_vla.data.normalization import compute_norm_stats
from atlas_vla.data.observations import ObservationHistory
from atlas_vla.data.samples import LiberoSamples, collate
from atlas_vla.data.sources import load_libero
from atlas_vla.models.policy import AtlasPolicy
from atlas_vla.runtime import LocalPolicy, PolicyRuntime


@pytest.fixture(scope="module")
def episode(sim_demos_dir):
    """Episode 0 of the recorded simulator demonstrations, as a dataset and as the observations a control
    loop would have received (upright HWC uint8 images as recorded, state, instruction)."""
    data = load_libero(str(sim_demos_dir), max_episodes=1)
    observations = [{"agentview_image": np.asarray(row[AGENT_IMAGE].convert("RGB")),
                     "wrist_image": np.asarray(row[WRIST_IMAGE].convert("RGB")),
                     "state": np.asarray(row[STATE], dtype=np.float32), "task_description": row[INSTRUCTION]}
                    for row in data]
    return data, observations


class Recorder(LocalPolicy):
    """The local policy, keeping the model inputs it built on each call and the chunk of each query."""

    def __init__(self, policy) -> None:
        super().__init__(policy)
        self.calls = []  # (model inputs, chunk or None for an observe-only step)

    def observe(self, observation):
        super().observe(observation)
        self.calls.append((self.history.model_inputs(), None))

    def predict_chunk(self, observation):
        chunk = super().predict_chunk(observation)
        self.calls.append((self.history.model_inputs(), chunk))
        return chunk


@pytest.mark.parametrize("frames, stride, replan", [(3, 2, 4), (2, 5, None), (1, 1, 3)])
def test_runtime_inputs_equal_the_training_samples_of_a_recorded_episode(episode, frames, stride, replan):
    """Replaying a recorded episode through `PolicyRuntime`, the model inputs it builds are exactly the
    training sample of the same frame (images of the current and context frames, clamped to the episode
    start; state; instruction), also on steps without a query, which the history must see when there is
    temporal context; each queried chunk is the policy's prediction for that sample."""
    data, observations = episode
    # 126 px from the recorded 128: the training decoder reads these JPEGs at full scale, as a camera delivers them
    config = tiny_policy_config(image_size=126, num_temporal_frames=frames, temporal_stride=stride)
    torch.manual_seed(0)
    policy = AtlasPolicy(config, compute_norm_stats(data))
    samples = LiberoSamples(data, config.sample_spec)
    recorder = Recorder(policy)
    runtime = PolicyRuntime(recorder, replan_steps=replan)
    runtime.reset()
    checked = queried = 0
    for step, observation in enumerate(observations[:30]):
        calls_before = len(recorder.calls)
        action = runtime.select_action(observation)
        assert action.shape == (7,) and action[6] in (-1.0, 1.0)
        is_query = step % (replan or config.action_horizon) == 0
        assert len(recorder.calls) == calls_before + (1 if is_query or frames > 1 else 0)
        if len(recorder.calls) == calls_before:
            continue
        inputs, chunk = recorder.calls[-1]
        sample = samples[step]
        torch.testing.assert_close(inputs[OBS_IMAGES], sample[OBS_IMAGES], rtol=0, atol=0)
        torch.testing.assert_close(inputs[OBS_STATE], sample[OBS_STATE], rtol=0, atol=0)
        assert inputs[INSTRUCTION] == sample[INSTRUCTION]
        checked += 1
        assert (chunk is not None) == is_query
        if is_query:
            expected = policy.predict_action_chunk(collate([sample]))[0].numpy()
            np.testing.assert_allclose(chunk, expected, rtol=0, atol=1e-6)
            queried += 1
    assert checked == (30 if frames > 1 else queried) and queried == -(-30 // (replan or config.action_horizon))


def test_a_new_episode_forgets_the_last_one(episode):
    data, observations = episode
    spec = tiny_policy_config(image_size=126, num_temporal_frames=2, temporal_stride=1).sample_spec
    history = ObservationHistory(spec)
    with pytest.raises(RuntimeError, match="no observation in this episode yet"):
        history.model_inputs()
    history.add(observations[5])
    history.add(observations[6])
    history.reset()
    history.add(observations[0])
    samples = LiberoSamples(data, spec)
    torch.testing.assert_close(history.model_inputs()[OBS_IMAGES], samples[0][OBS_IMAGES], rtol=0, atol=0)
    with pytest.raises(ValueError, match="uint8"):  # a bad observation is refused and the history is unchanged
        history.add({**observations[1], "agentview_image": observations[1]["agentview_image"].astype(np.float32)})
    assert len(history) == 1


def test_chunk_schedule_open_loop_and_temporal_ensembling():
    """Open loop runs `replan_steps` actions per query; ensembling averages every chunk that covers a
    step (oldest weighted most) and snaps the gripper back to -1/+1, so an earlier chunk's planned
    close is honoured even while newer chunks still hesitate."""
    def chunk(value: float, gripper: list[float]) -> np.ndarray:
        actions = np.zeros((len(gripper), 7))
        actions[:, 0] = value
        actions[:, 6] = gripper
        return actions

    open_loop = ChunkSchedule(replan_steps=2)
    assert open_loop.needs_query(0)
    open_loop.add(0, chunk(1.0, [-1, -1, -1, 1]))
    assert [open_loop.action(t)[0] for t in (0, 1)] == [1.0, 1.0] and open_loop.needs_query(2)
    with pytest.raises(ValueError, match=r"expected \(H, 7\)"):
        open_loop.add(2, np.zeros((4, 6)))

    ensemble = ChunkSchedule(ensemble_decay=np.log(2.0))  # weights 1, 1/2, 1/4 ... from the oldest
    ensemble.add(0, chunk(0.0, [-1, -1, 1]))
    assert ensemble.needs_query(1)
    np.testing.assert_allclose(ensemble.action(0), [0, 0, 0, 0, 0, 0, -1])
    ensemble.add(1, chunk(3.0, [-1, -1, -1]))
    ensemble.add(2, chunk(6.0, [-1, -1, -1]))
    action = ensemble.action(2)  # chunks from steps 0, 1, 2 cover step 2: (0 * 1 + 3 * 0.5 + 6 * 0.25) / 1.75
    assert action[0] == pytest.approx(3.0 / 1.75)
    assert action[6] == 1.0  # the oldest chunk's close (weight 1) outweighs the two newer -1s (0.5 + 0.25)
    action = ensemble.action(3)  # the step-0 chunk no longer covers step 3: (3 * 1 + 6 * 0.5) / 1.5
    assert action[0] == pytest.approx(4.0) and action[6] == -1.0
    with pytest.raises(ValueError, match="ensemble_decay must be >= 0"):
        ChunkSchedule(ensemble_decay=-1.0)


def test_chunk_schedule_edges():
    """One action per query and a decay of 0 (a plain mean) are valid; 0 actions per query is not; a chunk's
    actions are kept at float64 whatever the policy returned."""
    every_step = ChunkSchedule(replan_steps=1)
    every_step.add(0, np.full((4, 7), 0.5, dtype=np.float32))
    assert every_step.action(0).dtype == np.float64 and every_step.needs_query(1)
    with pytest.raises(ValueError) as raised:
        ChunkSchedule(replan_steps=0)
    assert str(raised.value) == "replan_steps must be >= 1 (or None for the whole chunk), got 0"
    mean = ChunkSchedule(ensemble_decay=0.0)
    mean.add(0, np.ones((2, 7), dtype=np.int64))
    mean.add(1, np.full((2, 7), 0.5))
    np.testing.assert_array_equal(mean.action(1), [0.75] * 6 + [1.0])
