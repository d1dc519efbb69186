"""Frames without an action (a rendered scene: NaN in every action dimension, with where things are): masked out of
the action loss and the action statistics, accepted only where the frame says where things are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import tiny_policy_config

from atlas_vla.constants import ACTIONS, ACTIONS_PAD_MASK, EPISODE_INDEX, FRAME_INDEX, OBJECT_POSITIONS
from atlas_vla.data.lerobot_writer import LeRobotV2Writer
from atlas_vla.data.normalization import compute_norm_stats
from atlas_vla.data.samples import LiberoSamples, LiberoSampleStream, collate
from atlas_vla.data.sources import load_libero
from atlas_vla.data.spec import SampleSpec
from atlas_vla.eval.offline import metric_sums, policy_means
from atlas_vla.models.policy import AtlasPolicy

SCENE_POSITIONS = np.array([[0.1, 0.2, 0.9, -0.1, 0.0, 0.9]], np.float32)


def _folder(root: Path) -> tuple[Path, np.ndarray]:
    """Two demonstrations of 5 frames (positions unknown) then two one-frame scenes (no action; positions known);
    returns the folder and the demonstrations' actions (10, 7)."""
    rng = np.random.default_rng(0)
    writer = LeRobotV2Writer(root / "mixed", fps=20)
    demo_actions = rng.uniform(-1, 1, (10, 7)).astype(np.float32)
    for episode in range(2):
        writer.add_episode(rng.integers(0, 255, (5, 16, 16, 3), np.uint8), rng.integers(0, 255, (5, 16, 16, 3), np.uint8),
                           rng.normal(size=(5, 8)).astype(np.float32), demo_actions[5 * episode: 5 * episode + 5],
                           "pick up the bowl", object_positions=np.full((5, 6), np.nan, np.float32))
    for scene in range(2):
        writer.add_episode(rng.integers(0, 255, (1, 16, 16, 3), np.uint8), rng.integers(0, 255, (1, 16, 16, 3), np.uint8),
                           rng.normal(size=(1, 8)).astype(np.float32), np.full((1, 7), np.nan, np.float32),
                           "pick up the black bowl next to the plate", object_positions=SCENE_POSITIONS + scene)
    return writer.close(), demo_actions


def _set_cell(root: Path, episode: int, column: str, values: list[float]) -> None:
    """Put `values` into `column` of the first frame of `episode` of a written folder."""
    path = root / "data" / "chunk-000" / f"episode_{episode:06d}.parquet"
    table = pq.read_table(path)
    cells = table.column(column).to_pylist()
    cells[0] = values
    index = table.schema.get_field_index(column)
    pq.write_table(table.set_column(index, table.field(index), pa.array(cells, table.field(index).type)), path)


def test_a_scene_trains_only_the_locate_query_and_stays_out_of_the_action_statistics(tmp_path):
    root, demo_actions = _folder(tmp_path)
    data = load_libero(str(root))
    config = tiny_policy_config(action_horizon=3, locate_weight=1.0)
    samples = LiberoSamples(data, config.sample_spec)
    by_episode: dict[int, list] = {}
    for index in range(len(samples)):
        by_episode.setdefault(samples[index][EPISODE_INDEX], []).append(samples[index])
    scene = by_episode[2][0]
    assert scene[ACTIONS_PAD_MASK].all() and torch.equal(scene[ACTIONS], torch.zeros(3, 7))
    assert torch.equal(scene[OBJECT_POSITIONS], torch.from_numpy(SCENE_POSITIONS[0]))
    last_but_one = by_episode[0][3]  # a demonstration: its chunk runs one step past its end
    assert last_but_one[ACTIONS_PAD_MASK].tolist() == [False, False, True]
    assert torch.equal(last_but_one[ACTIONS][:2], torch.from_numpy(demo_actions[3:5]))
    streamed = {(s[EPISODE_INDEX], s[FRAME_INDEX]): s for s in LiberoSampleStream(
        load_libero(str(root), streaming=True), config.sample_spec)}
    assert sorted(key for key, s in streamed.items() if s[ACTIONS_PAD_MASK].all()) == [(2, 0), (3, 0)]
    assert torch.equal(streamed[(3, 0)][ACTIONS], torch.zeros(3, 7))

    stats = compute_norm_stats(data)
    assert stats.num_frames == 12
    assert np.allclose(stats.action.mean, demo_actions.mean(0), atol=1e-6)
    assert np.allclose(stats.action.max, demo_actions.max(0))

    torch.manual_seed(0)
    policy = AtlasPolicy(config, stats)
    out = policy(collate([by_episode[2][0], by_episode[3][0]]))
    out["loss"].backward()
    assert out["pose_loss"].item() == 0.0 and out["gripper_loss"].item() == 0.0
    assert out["locate_loss"].item() > 0 and torch.isfinite(out["loss"])
    assert not policy.head.out.weight.grad.any()
    assert policy.locator.weight.grad.any()

    # validation: the locate loss is the mean over the coordinates known, the action metrics over the action steps
    policy.eval()
    scenes, demos = collate([by_episode[2][0], by_episode[3][0]]), collate(by_episode[0][:4])
    metrics = policy_means("val/", policy, *metric_sums(policy, [scenes, demos]))
    with torch.no_grad():
        on_scenes, on_demos = policy(scenes), policy(demos)
    assert metrics["val/locate_loss"] == pytest.approx(on_scenes["locate_loss"].item(), rel=1e-6)
    assert metrics["val/pose_l1_error"] == pytest.approx(on_demos["pose_l1_error"].item(), rel=1e-6)
    # the loss of the two batches as one: the demonstrations' action losses and the scenes' locate loss
    assert metrics["val/loss"] == pytest.approx(on_demos["pose_loss"].item() + 0.1 * on_demos["gripper_loss"].item()
                                                + 1.0 * on_scenes["locate_loss"].item(), rel=1e-6)


def test_a_frame_without_an_action_must_say_where_things_are_and_a_partial_nan_is_corrupt(tmp_path):
    root, _ = _folder(tmp_path)
    spec = SampleSpec(image_size=56, action_horizon=3)
    _set_cell(root, 3, OBJECT_POSITIONS, [float("nan")] * 6)
    message = (r"column 'action' holds a non-finite value \(nan\) at episode 3, frame 0, dimension 0; a frame "
               r"without an action \(NaN in every dimension\) must say where things are")
    with pytest.raises(ValueError, match=message):
        LiberoSamples(load_libero(str(root)), spec)
    with pytest.raises(ValueError, match=r"at row 11 \(episode 3\), dimension 0; a frame without an action"):
        compute_norm_stats(load_libero(str(root)))

    _set_cell(root, 3, OBJECT_POSITIONS, SCENE_POSITIONS[0].tolist())
    _set_cell(root, 1, "actions", [0.0, float("nan"), 0.0, 0.0, 0.0, 0.0, 0.0])
    message = r"column 'action' holds a non-finite value \(nan\) at episode 1, frame 0, dimension 1; expected finite"
    with pytest.raises(ValueError, match=message):
        LiberoSamples(load_libero(str(root)), spec)
    with pytest.raises(ValueError, match=message):
        list(LiberoSampleStream(load_libero(str(root), streaming=True), spec))
