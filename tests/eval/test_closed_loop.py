"""The closed-loop recipe end to end, small: configs/sim_demos.yaml trains a few steps on two real
simulator demonstrations (two instructions), then the trained policy drives a 10-step rollout in
the real simulator through the evaluation workers' code path. No assertion on success; everything
that silently gives 0% success is pinned: image orientation, state layout, chunk shapes, gripper
values, the instruction reaching the model, and the video."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import HAS_SIM
from PIL import Image

from atlas_vla.data.transforms import observation_to_sample, rotate_180
from atlas_vla.runtime import LocalPolicy

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("MUJOCO_GL", "egl")


class Recorder(LocalPolicy):
    """The local policy, keeping every observation it was queried with and every chunk it returned."""

    def __init__(self, policy) -> None:
        super().__init__(policy)
        self.observations, self.chunks = [], []

    def predict_chunk(self, observation):
        self.observations.append(observation)
        self.chunks.append(super().predict_chunk(observation))
        return self.chunks[-1]


@pytest.mark.skipif(not HAS_SIM, reason="the LIBERO simulator ([sim] extra) is not installed")
@pytest.mark.sim
@pytest.mark.slow
def test_sim_demos_recipe_trains_and_drives_the_simulator(tmp_path, sim_demos_dir):
    from atlas_vla.config import load_config
    from atlas_vla.eval import libero_sim as sim
    from atlas_vla.models.policy import AtlasPolicy

    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/sim_demos.yaml", "--data.source", str(sim_demos_dir),
         "--data.train_episodes", "[0, 20]", "--data.val_episodes", "[40]", "--output_dir", str(out),
         "--train_batch_size", "8", "--max_train_steps", "3", "--lr_warmup_steps", "1", "--validation_steps", "3",
         "--training.num_validation_batches", "1", "--dataloader_num_workers", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "building the feature store" in result.stdout + result.stderr
    [store] = [path for path in (tmp_path / "feature_stores").iterdir() if path.is_dir()]  # auto: beside the run
    assert (store / "store.json").is_file()
    policy = AtlasPolicy.from_pretrained(out / "final")
    horizon = policy.config.action_horizon
    config_eval = load_config(REPO / "configs" / "sim_demos.yaml").eval

    recorder = Recorder(policy)
    spec = sim.EpisodeSpec("libero_spatial", 0, 0, max_steps=10, replan_steps=config_eval.replan_steps,
                           camera_size=config_eval.camera_size, video_dir=str(tmp_path / "videos"))
    envs: dict = {}
    try:
        episode = sim.evaluate_episode(spec, recorder, envs)
    finally:
        for env in envs.values():
            env.close()

    # the rollout: 10 steps, one query per replan_steps actions, chunks of (horizon, 7), gripper exactly -1/+1
    assert episode.error is None and episode.steps == 10 and not episode.success
    assert len(recorder.chunks) == -(-10 // config_eval.replan_steps)
    for chunk in recorder.chunks:
        assert chunk.shape == (horizon, 7) and np.isfinite(chunk).all()
        assert set(np.unique(chunk[:, 6])) <= {-1.0, 1.0}

    # orientation and state: episode 0 was recorded from task 0, initial state 0, so the first frame the
    # policy sees is the recorded first frame (upright), not its 180-degree rotation
    table = pq.read_table(sim_demos_dir / "data" / "chunk-000" / "episode_000000.parquet")
    recorded = np.asarray(Image.open(io.BytesIO(table["image"][0].as_py()["bytes"])).convert("RGB")).astype(float)
    first = recorder.observations[0]
    assert first["agentview_image"].shape == (128, 128, 3) and first["wrist_image"].shape == (128, 128, 3)
    assert np.abs(first["agentview_image"] - recorded).mean() < 6  # JPEG noise only
    assert np.abs(rotate_180(first["agentview_image"]) - recorded).mean() > 20
    wrist = np.asarray(Image.open(io.BytesIO(table["wrist_image"][0].as_py()["bytes"])).convert("RGB")).astype(float)
    assert np.abs(first["wrist_image"] - wrist).mean() < np.abs(rotate_180(first["wrist_image"]) - wrist).mean()
    np.testing.assert_allclose(first["state"], np.stack(table["state"].to_pylist())[0], atol=2e-3)
    # what the model is given: the agent view, then the wrist camera, each resized and never shifted
    sample = observation_to_sample(first, policy.config.sample_spec)
    assert policy.config.use_wrist_camera
    images = sample["observation.images"].numpy()
    assert images.shape == (2, 3, policy.config.image_size, policy.config.image_size)
    size = policy.config.image_size
    for view, camera in zip(images, ("agentview_image", "wrist_image")):  # PIL's bilinear resize, computed apart
        expected = np.asarray(Image.fromarray(first[camera]).resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)
        assert np.abs(view.astype(int) - expected.astype(int)).max() <= 1  # within one grey level
    no_wrist = observation_to_sample({**first, "wrist_image": np.zeros_like(first["wrist_image"])},
                                     policy.config.sample_spec)["observation.images"].numpy()
    np.testing.assert_array_equal(images[0], no_wrist[0])
    assert np.abs(images[1].astype(float) - no_wrist[1]).mean() > 20

    # the instruction reaches the model: it was encoded, and another instruction changes the actions
    assert first["task_description"] == "pick up the black bowl between the plate and the ramekin and place it on the plate"
    assert first["task_description"] in policy.frozen.language._cache
    other = {**first, "task_description": "pick up the black bowl next to the ramekin and place it on the plate"}
    mine = policy.predict_action(first)
    assert np.abs(policy.predict_action(other)[:, :6] - mine[:, :6]).max() > 1e-4

    # the video: one upright frame per executed step
    import imageio.v2 as imageio

    frames = imageio.mimread(episode.video, memtest=False)
    assert len(frames) == 10 and frames[0].shape == (128, 128, 3)
    assert np.abs(frames[0].astype(float) - recorded).mean() < 8  # mp4 + JPEG noise


def test_the_layouts_recipe_is_the_five_task_recipe_with_generated_layouts_and_paraphrases(sim_demos_dir):
    """configs/sim_layouts.yaml changes exactly its levers against configs/sim_demos.yaml, and feeds the model both
    cameras at 126 px, shifted, with half the training frames' instructions paraphrased; validation frames keep
    their recorded instruction and exact images."""
    from atlas_vla.config import load_config, to_dict
    from atlas_vla.constants import INSTRUCTION, OBS_IMAGES
    from atlas_vla.data.paraphrases import paraphrases
    from atlas_vla.data.samples import build_samples
    from atlas_vla.data.sources import load_libero

    base, recipe = (to_dict(load_config(REPO / "configs" / name)) for name in ("sim_demos.yaml", "sim_layouts.yaml"))
    changed = {f"{section}.{key}" for section, values in base.items() if isinstance(values, dict)
               for key, value in values.items() if recipe[section][key] != value}
    assert changed == {"data.source", "data.paraphrase_prob", "training.output_dir"}
    assert recipe["data"]["source"] == [*base["data"]["source"], "data/generated"]
    assert recipe["data"]["paraphrase_prob"] == 0.5

    config = load_config(REPO / "configs" / "sim_layouts.yaml")
    dataset = load_libero(str(sim_demos_dir), max_episodes=3)
    recorded = list(dataset[INSTRUCTION])
    rows = list(range(0, len(dataset), 3))
    train = build_samples(dataset, config.model.sample_spec, config.data, train=True).__getitems__(rows)
    exact = build_samples(dataset, config.model.sample_spec, config.data, train=False).__getitems__(rows)
    assert train[0][OBS_IMAGES].shape == (2, 3, 126, 126)
    shifted = sum(bool((a[OBS_IMAGES] != b[OBS_IMAGES]).any()) for a, b in zip(train, exact))
    assert shifted > 0.8 * len(rows)
    said = [sample[INSTRUCTION] for sample in train]
    changed_words = [(recorded[row], now) for row, now in zip(rows, said) if now != recorded[row]]
    assert 0.3 * len(rows) < len(changed_words) < 0.7 * len(rows)
    assert all(now in paraphrases(was) for was, now in changed_words)
    assert [sample[INSTRUCTION] for sample in exact] == [recorded[row] for row in rows]
