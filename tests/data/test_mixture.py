"""Several sources in one run: one table keyed by instruction, per-source split, union statistics,
and a clear error before anything is written when the sources record different frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from atlas_vla.cli import main as cli
from atlas_vla.config import TrainConfig, save_config
from atlas_vla.constants import EPISODE_INDEX, FRAME_INDEX, INSTRUCTION, OBJECT_POSITIONS, SOURCE_INDEX
from atlas_vla.data.config import DataConfig
from atlas_vla.data.lerobot_writer import LeRobotV2Writer
from atlas_vla.data.normalization import NormStats, compute_norm_stats
from atlas_vla.data.samples import LiberoSamples, build_samples
from atlas_vla.data.spec import SampleSpec
from atlas_vla.data.split import load_train_val

SHARED = "put the bowl on the plate"


def write_source(path: Path, instructions: list[str], *, fps: int = 20, size: int = 16, seed: int = 0) -> Path:
    """A LeRobot v2 folder with one 5-frame episode per instruction, written by the real writer."""
    rng = np.random.default_rng(seed)
    writer = LeRobotV2Writer(path, fps=fps)
    for instruction in instructions:
        images = rng.integers(0, 255, (5, size, size, 3), dtype=np.uint8)
        states = rng.normal(size=(5, 8)).astype(np.float32)
        actions = np.concatenate([rng.normal(size=(5, 6)), np.ones((5, 1))], axis=1).astype(np.float32)
        writer.add_episode(images, images, states, actions, instruction)
    return writer.close()


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mixture")
    a = write_source(root / "a", [SHARED, "open the drawer", "close the drawer", SHARED], seed=1)
    b = write_source(root / "b", ["turn on the stove", SHARED, "push the plate"], seed=2)
    return a, b


def episodes_of(table) -> list[int]:
    return sorted(set(np.asarray(table.select_columns([EPISODE_INDEX]).with_format("numpy")[:][EPISODE_INDEX]).tolist()))


def test_one_table_keyed_by_instruction_with_a_split_per_source(two_sources):
    a, b = two_sources
    config = DataConfig(source=[str(a), str(b)], val_fraction=0.25, split_seed=3)
    train, val = load_train_val(config)
    # each source is split exactly as it would be alone; its episodes follow the previous source's
    alone = [load_train_val(DataConfig(source=str(s), val_fraction=0.25, split_seed=3)) for s in (a, b)]
    assert episodes_of(train) == episodes_of(alone[0][0]) + [4 + e for e in episodes_of(alone[1][0])]
    assert episodes_of(val) == episodes_of(alone[0][1]) + [4 + e for e in episodes_of(alone[1][1])]
    everything, _ = load_train_val(DataConfig(source=[str(a), str(b)], val_fraction=0.0))
    assert len(everything) == 7 * 5 and set(everything.unique(SOURCE_INDEX)) == {0, 1}
    assert sorted(everything.unique(INSTRUCTION)) == sorted({SHARED, "open the drawer", "close the drawer",
                                                             "turn on the stove", "push the plate"})
    samples = LiberoSamples(everything, SampleSpec(image_size=14, action_horizon=2))
    shared = {samples[i][EPISODE_INDEX] for i in range(len(samples)) if samples[i][INSTRUCTION] == SHARED}
    assert shared == {0, 3, 5}  # one task, episodes from both sources


def test_statistics_over_the_union_record_every_source(two_sources, tmp_path, capsys):
    a, b = two_sources
    config = DataConfig(source=[str(a), str(b)], val_fraction=0.0)
    union = compute_norm_stats(load_train_val(config)[0], config.sources)
    assert union.num_frames == 35 and [s["num_frames"] for s in union.sources] == [20, 15]
    assert [s["source"] for s in union.sources] == [a.name, b.name]  # a policy's statistics name no local path
    assert union.sources[0]["fingerprint"] == compute_norm_stats(load_train_val(
        DataConfig(source=str(a), val_fraction=0.0))[0]).fingerprint  # source 0's episodes keep their indices
    out = tmp_path / "stats.json"
    assert cli(["compute-stats", str(a), str(b), "--val-fraction", "0", "--output", str(out)]) == 0
    assert NormStats.load(out).to_dict() == union.to_dict()
    run = save_config(TrainConfig(data=config), tmp_path / "run.yaml")
    assert cli(["compute-stats", "--config", str(run), "--output", str(out)]) == 0
    assert NormStats.load(out).to_dict() == union.to_dict()
    assert cli(["data-info", str(a), str(b)]) == 0
    assert "union of 2 sources: 7 episodes, 35 frames, 5 tasks (by instruction)" in capsys.readouterr().out


@pytest.mark.parametrize("change,message", [
    ({"fps": 10}, "disagree on fps: 20 vs 10"),
    ({"size": 24}, "disagree on observation.images.agentview shape: (16, 16, 3) vs (24, 24, 3)"),
])
def test_sources_that_record_different_frames_fail_before_training(two_sources, tmp_path, change, message, capsys):
    a, _ = two_sources
    other = write_source(tmp_path / "other", [SHARED], **change)
    with pytest.raises(ValueError, match=rf"data.source: {a} and {other} {message}".replace("(", r"\(").replace(")", r"\)")):
        load_train_val(DataConfig(source=[str(a), str(other)]))
    out = tmp_path / "run"
    from atlas_vla.training.train import main as train_main

    argv = ["--config", "configs/demo.yaml", "--data.source", f"[{a}, {other}]", "--data.generate_synthetic", "false",
            "--output_dir", str(out)]
    assert train_main(argv) == 2 and message in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_single_source_settings_are_refused_with_several():
    with pytest.raises(ValueError, match="DataConfig.val_episodes applies to a single source"):
        DataConfig(source=["a/b", "c/d"], val_episodes=[1])
    assert DataConfig(source=["only/one"]).source == "only/one"


def test_a_run_trains_on_several_sources_and_records_them(two_sources, tmp_path):
    from atlas_vla.training.train import main as train_main

    a, b = two_sources
    out = tmp_path / "run"
    argv = ["--config", "configs/demo.yaml", "--data.source", f"[{a}, {b}]", "--data.generate_synthetic", "false",
            "--data.val_fraction", "0.25", "--output_dir", str(out), "--model.image_size", "28",
            "--train_batch_size", "4", "--max_train_steps", "16", "--lr_warmup_steps", "1", "--validation_steps", "16",
            "--logging.log_every_steps", "1", "--logging.log_media", "false", "--data.source_weights", "[1, 3]"]
    assert train_main(argv) == 0
    stats = NormStats.load(out / "final" / "norm_stats.json")
    assert [s["source"] for s in stats.sources] == [a.name, b.name]
    # what the run trained on, as it logged it: every sample counted once, three in four from the second source
    # (by the sources' sizes it would be fewer than half); the draw is seeded, so this is the same every run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    drawn = np.array([[row["train/samples/source_0"], row["train/samples/source_1"]] for row in rows
                      if "train/loss" in row])
    assert drawn.shape == (16, 2) and (drawn.sum(axis=1) == 4).all()
    share = drawn[:, 1].sum() / drawn.sum()
    sizes = np.bincount(load_train_val(DataConfig(source=[str(a), str(b)], val_fraction=0.25))[0]["source_index"])
    assert abs(share - 0.75) < 0.15 and sizes[1] / sizes.sum() < 0.5


def test_source_weights_are_respected_in_expectation_and_deterministic(two_sources):
    from atlas_vla.data.mixture import SourceWeightedSampler

    a, b = two_sources
    train, _ = load_train_val(DataConfig(source=[str(a), str(b)], val_fraction=0.0, source_weights=[1, 3]))
    samples = LiberoSamples(train, SampleSpec(image_size=14, action_horizon=2))
    assert samples.sample_sources.tolist() == [0] * 20 + [1] * 15
    sampler = SourceWeightedSampler(samples.sample_sources, [1, 3], seed=0)
    drawn = []
    for epoch in range(200):
        sampler.set_epoch(epoch)
        drawn.extend(iter(sampler))
    share = np.mean(samples.sample_sources[drawn] == 1)
    assert len(drawn) == 200 * 35 and share == pytest.approx(0.75, abs=0.02)  # by size it would be 15/35 = 0.43
    sampler.set_epoch(7)
    first = list(sampler)
    assert list(sampler) == first and first != drawn[:35]  # (seed, epoch) decides the draw
    with pytest.raises(ValueError, match="needs one weight per source of several"):
        DataConfig(source=[str(a), str(b)], source_weights=[1.0])
    with pytest.raises(ValueError, match="must all be > 0"):
        DataConfig(source=[str(a), str(b)], source_weights=[1.0, 0.0])



@pytest.mark.slow
def test_a_source_weighted_run_resumes_exactly(two_sources, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from atlas_vla.training.train import main as train_main

    a, b = two_sources

    def args(out: Path, *extra: str) -> list[str]:
        return ["--config", "configs/demo.yaml", "--data.source", f"[{a}, {b}]", "--data.generate_synthetic", "false",
                "--data.val_fraction", "0", "--data.source_weights", "[1, 3]", "--output_dir", str(out),
                "--model.image_size", "28", "--train_batch_size", "4", "--max_train_steps", "12",
                "--lr_warmup_steps", "1", "--checkpointing_steps", "4", "--logging.log_media", "false", *extra]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_main(args(straight)) == 0
    assert train_main(args(resumed)) == 0
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-12")  # a crash after step 8, where the second epoch starts
    shutil.rmtree(resumed / "final")
    assert train_main(args(resumed, "--resume_from_checkpoint", "latest")) == 0
    first, second = (load_file(str(out / "final" / "model.safetensors")) for out in (straight, resumed))
    assert first.keys() == second.keys() and all(bool((first[k] == second[k]).all()) for k in first)


def test_a_feature_store_serves_the_joined_samples(two_sources, tmp_path):
    from helpers import tiny_policy_config

    from atlas_vla.data.feature_store import StoredFeatureSamples, StoreKey, build_store
    from atlas_vla.models.policy import AtlasPolicy

    a, b = two_sources
    train, _ = load_train_val(DataConfig(source=[str(a), str(b)], val_fraction=0.0))
    policy = AtlasPolicy(tiny_policy_config(image_size=14), compute_norm_stats(train))
    samples = LiberoSamples(train, policy.config.sample_spec)
    key = StoreKey.for_policy(policy, samples, copies=1, device_type="cpu")
    store = build_store(tmp_path / "store", samples, policy.vision_features, key, policy.vision_feature_shape(),
                        batch_size=8, progress=False)
    stored = StoredFeatureSamples(samples, store)
    assert len(stored) == 35 and [stored[i][INSTRUCTION] for i in (0, 34)] == [samples[0][INSTRUCTION],
                                                                              samples[34][INSTRUCTION]]
    assert stored.sample_sources.tolist() == samples.sample_sources.tolist()


def test_a_source_that_says_where_its_objects_are_is_joined_with_one_that_does_not(two_sources, tmp_path):
    """`object_positions` written by the writer reach the samples by value; a source without them is joined with
    NaN (unknown), in a map-style table and in a stream alike."""
    a, _ = two_sources
    rng = np.random.default_rng(4)
    writer = LeRobotV2Writer(tmp_path / "placed", fps=20)
    images = rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)
    actions = np.concatenate([rng.normal(size=(5, 6)), np.ones((5, 1))], axis=1).astype(np.float32)
    positions = np.arange(30, dtype=np.float32).reshape(5, 6) / 100
    positions[3:, :3] = np.nan
    writer.add_episode(images, images, rng.normal(size=(5, 8)).astype(np.float32), actions, SHARED,
                       object_positions=positions)
    with pytest.raises(ValueError, match="episode 1: object_positions missing; the episodes before it had"):
        writer.add_episode(images, images, rng.normal(size=(5, 8)).astype(np.float32), actions, SHARED)
    placed = writer.close()
    assert json.loads((placed / "meta" / "info.json").read_text())["features"]["object_positions"]["shape"] == [6]

    for streaming in (False, True):
        train, _ = load_train_val(DataConfig(source=[str(a), str(placed)], val_fraction=0.0, streaming=streaming))
        samples = list(build_samples(train, SampleSpec(image_size=14, action_horizon=2)))  # a stream or a map
        found = {(s[EPISODE_INDEX], s[FRAME_INDEX]): s[OBJECT_POSITIONS].numpy() for s in samples}
        assert len(found) == 25
        np.testing.assert_array_equal(np.stack([found[(4, f)] for f in range(5)]), positions)  # NaN where it was
        assert all(np.isnan(found[(e, f)]).all() for e in range(4) for f in range(5))  # source a: nothing known
