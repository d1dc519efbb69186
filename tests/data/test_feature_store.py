"""FeatureStore: the frozen backbone's outputs written once to disk give the features the live backbone gives,
are keyed so that a store is never used for other inputs, survive a killed build, are the same whether one or
two processes built them, and train the same weights (and resume exactly) without the backbone in the loop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import offline_environment, synthetic_dataset, tiny_policy_config
from safetensors import safe_open
from safetensors.torch import load_file

from atlas_vla.config import load_config
from atlas_vla.constants import OBS_IMAGES, OBS_VISION_FEATURES
from atlas_vla.data.config import DataConfig
from atlas_vla.data.feature_store import (
    MANIFEST,
    FeatureStore,
    StoredFeatureSamples,
    StoreKey,
    build_store,
)
from atlas_vla.data.normalization import compute_norm_stats
from atlas_vla.data.samples import build_samples, collate
from atlas_vla.data.sources import load_libero
from atlas_vla.models.policy import AtlasPolicy
from atlas_vla.schema import RenamedWarning

REPO = Path(__file__).resolve().parents[2]
SHARD_BYTES = 200_000  # a few samples per shard, so the tests see several shards


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    dataset = load_libero(str(synthetic_dataset(tmp_path_factory.mktemp("data"), num_episodes=2)))
    policy = AtlasPolicy(tiny_policy_config(), compute_norm_stats(dataset)).eval()
    spec = policy.config.sample_spec
    return dataset, policy, build_samples(dataset, spec), build_samples(dataset, spec, DataConfig(random_shift=4),
                                                                          train=True)


def build(path: Path, samples, policy, copies: int = 1, **kwargs) -> FeatureStore:
    key = StoreKey.for_policy(policy, samples, copies=copies, device_type="cpu")
    return build_store(path, samples, policy.vision_features, key, policy.vision_feature_shape(), batch_size=5,
                       progress=False, shard_bytes=SHARD_BYTES, **kwargs)


def test_stored_features_match_the_live_backbone(setup, tmp_path):
    _, policy, samples, _ = setup
    store = build(tmp_path / "store", samples, policy)
    L, S, T, C2 = policy.vision_feature_shape()
    assert (L, S, T, C2) == (2, 2, 1 + 4 * 4, 128)  # camera token + 4 x 4 patches of each layer; registers dropped
    assert store.num_samples == len(samples) and store.copies == 1 and store.nbytes == len(samples) * L * S * T * C2 * 2
    shards = sorted((tmp_path / "store").glob("features-*.safetensors"))
    assert len(shards) > 2 and not list(tmp_path.glob(".store.partial"))

    stored = StoredFeatureSamples(samples, store)
    indices = [0, 8, len(samples) - 1]
    live, batch = collate(samples.__getitems__(indices)), collate(stored.__getitems__(indices))
    assert OBS_IMAGES not in batch and OBS_IMAGES in live
    expected = policy.vision_features(live[OBS_IMAGES])
    assert expected.shape == (3, L, S, T, C2) and batch[OBS_VISION_FEATURES].dtype == torch.float16
    torch.testing.assert_close(batch[OBS_VISION_FEATURES].float(), expected, atol=2e-2, rtol=2e-3)  # float16 storage
    for key in ("actions", "actions_is_pad", "observation.state", "episode_index", "frame_index"):
        torch.testing.assert_close(batch[key], live[key])
    assert batch["instruction"] == live["instruction"]
    with torch.no_grad():
        assert float(policy(live)["loss"]) == pytest.approx(float(policy(batch)["loss"]), abs=1e-3)
        torch.testing.assert_close(policy.predict_action_chunk(live), policy.predict_action_chunk(batch), atol=1e-3,
                                   rtol=1e-3)

    # a plain safetensors file: readable without atlas-vla, sample i of shard k at row i - first
    manifest = json.loads((tmp_path / "store" / MANIFEST).read_text())
    second = manifest["shards"][1]
    with safe_open(str(shards[1]), "pt") as file:
        assert int(file.metadata()["first"]) == second["first"]
        torch.testing.assert_close(file.get_slice("features")[1][0], store.read(second["first"] + 1, 0))


def test_shifted_copies_have_their_own_seeds_and_are_drawn_at_random(setup, tmp_path):
    _, policy, exact, shifted = setup
    store = build(tmp_path / "a", shifted, policy, copies=3)
    copies = torch.stack([store.read(0, copy).float() for copy in range(3)])
    assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[1], copies[2])
    live = policy.vision_features(collate(exact.__getitems__([0]))[OBS_IMAGES])[0]
    assert all(not torch.allclose(copy, live, atol=2e-2) for copy in copies)  # every copy was shifted
    # the shifts of a sample do not depend on the batches or on the global random state
    torch.manual_seed(123)
    other = build(tmp_path / "b", shifted, policy, copies=3)
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # each epoch reads each sample from one copy, chosen by (seed, epoch, sample): every copy gets used, and a
    # resumed run reads the copies an uninterrupted one reads
    stored = StoredFeatureSamples(shifted, store, seed=5)

    def copy_read(epoch: int, index: int) -> int:
        stored.set_epoch(epoch)
        features = stored[index][OBS_VISION_FEATURES].float()
        all_copies = torch.stack([store.read(index, copy).float() for copy in range(3)])
        return int(torch.argmin((all_copies - features).abs().flatten(1).sum(1)))

    assert {copy_read(epoch, 0) for epoch in range(30)} == {0, 1, 2}
    assert [copy_read(1, i) for i in range(10)] == [copy_read(1, i) for i in range(10)]
    assert [copy_read(1, i) for i in range(10)] != [copy_read(2, i) for i in range(10)]
    assert len({stored.copy_of(i) for i in range(len(stored))}) == 3
    assert other.key == store.key


def test_a_mismatched_key_is_refused_naming_the_fields(setup, tmp_path):
    dataset, policy, samples, shifted = setup
    store = build(tmp_path / "store", samples, policy)
    bigger = AtlasPolicy(tiny_policy_config(image_size=70), policy.norm_stats)
    bigger_samples = build_samples(dataset, bigger.config.sample_spec)
    key = StoreKey.for_policy(bigger, bigger_samples, copies=1, device_type="cpu")
    with pytest.raises(ValueError) as error:
        store.check_key(key)
    assert str(error.value) == (f"feature store {tmp_path / 'store'} was built for other inputs: image_size: 56 in "
                                "the store, 70 for this run (point training.feature_store elsewhere, use auto, or "
                                "delete the store)")  # the same stored frames and weights: only the size differs
    other_weights = AtlasPolicy(tiny_policy_config(vggt_init_seed=1), policy.norm_stats)
    with pytest.raises(ValueError, match=r"backbone: '[0-9a-f]+' in the store, '[0-9a-f]+' for this run \("):
        store.check_key(StoreKey.for_policy(other_weights, samples, copies=1, device_type="cpu"))
    shifted_key = StoreKey.for_policy(policy, shifted, copies=2, device_type="cpu")
    assert {d.split(":")[0] for d in store.key.differences(shifted_key)} == {"random_shift", "copies"}
    assert store.key.digest() != shifted_key.digest()


def test_a_truncated_or_foreign_shard_is_named(setup, tmp_path):
    _, policy, samples, _ = setup
    build(tmp_path / "store", samples, policy)
    shard = tmp_path / "store" / "features-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"features-00001.safetensors is truncated: \d+ bytes, expected \d+; "
                                         r"delete the store to build it again"):
        FeatureStore(tmp_path / "store")
    shard.write_bytes(data[:5])
    with pytest.raises(ValueError, match="features-00001.safetensors: 5 bytes, not a safetensors file"):
        FeatureStore(tmp_path / "store")
    shard.unlink()
    with pytest.raises(ValueError, match="features-00001.safetensors is missing"):
        FeatureStore(tmp_path / "store")
    with pytest.raises(ValueError, match=r"is not a feature store: store.json is missing"):
        FeatureStore(tmp_path)
    mine = tmp_path / "my_files"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"my_files exists and is not a finished feature store"):
        build(mine, samples, policy)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_a_killed_build_resumes_and_ends_identical(setup, tmp_path):
    _, policy, _, shifted = setup
    reference = build(tmp_path / "reference", shifted, policy, copies=2)
    # a real SIGKILL in the middle of the fourth shard: no handler, no cleanup
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from helpers import synthetic_dataset, tiny_policy_config
        from atlas_vla.data.config import DataConfig
        from atlas_vla.data.feature_store import StoreKey, build_store
        from atlas_vla.data.normalization import compute_norm_stats
        from atlas_vla.data.samples import build_samples
        from atlas_vla.data.sources import load_libero
        from atlas_vla.models.policy import AtlasPolicy
        from pathlib import Path
        dataset = load_libero(str(synthetic_dataset(Path({str(tmp_path)!r}), num_episodes=2)))
        policy = AtlasPolicy(tiny_policy_config(), compute_norm_stats(dataset)).eval()
        samples = build_samples(dataset, policy.config.sample_spec, DataConfig(random_shift=4), train=True)
        calls = [0]
        def encode(images):
            calls[0] += 1
            if calls[0] == 8:
                os.kill(os.getpid(), signal.SIGKILL)
            return policy.vision_features(images)
        key = StoreKey.for_policy(policy, samples, copies=2, device_type="cpu")
        build_store({str(tmp_path / "store")!r}, samples, encode, key, policy.vision_feature_shape(), batch_size=5,
                    progress=False, shard_bytes={SHARD_BYTES})
    """)
    result = subprocess.run([sys.executable, "-c", script], env=offline_environment(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    partial = tmp_path / ".store.partial"
    done = sorted(p.name for p in partial.glob("features-*.safetensors"))
    assert 0 < len(done) < len(json.loads((partial / "plan.json").read_text())["shards"])
    before = {name: (partial / name).stat().st_mtime_ns for name in done}

    resumed = build(tmp_path / "store", shifted, policy, copies=2)
    assert {name: (tmp_path / "store" / name).stat().st_mtime_ns for name in done} == before  # kept, not redone
    assert not partial.exists() and resumed.key == reference.key
    names = sorted(p.name for p in (tmp_path / "reference").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "store").iterdir())  # no stray temporary file either
    for name in names:
        assert (tmp_path / "reference" / name).read_bytes() == (tmp_path / "store" / name).read_bytes(), name


def test_cache_frozen_features_is_read_as_feature_store_auto_and_bad_combinations_are_refused():
    with pytest.warns(RenamedWarning, match="training.cache_frozen_features: true is deprecated: use "
                                            "training.feature_store: auto"):
        config = load_config(None, {"training": {"cache_frozen_features": True}})
    assert config.training.feature_store == "auto" and config.training.cache_frozen_features is False
    with pytest.raises(ValueError, match=r"cached_copies: 4 .* data.random_shift > 0 \(got 0\)"):
        load_config(None, {"training": {"feature_store": "auto", "cached_copies": 4}})
    with pytest.raises(ValueError, match=r"feature_store: auto needs data.streaming: false \(got True\)"):
        load_config(None, {"training": {"feature_store": "auto"}, "data": {"streaming": True}})
    with pytest.raises(ValueError, match=r"model.freeze_vggt: true \(got False\)"):
        load_config(None, {"training": {"feature_store": "auto"}, "model": {"freeze_vggt": False}})


# ---------------------------------------------------------------------------------------------------
# with the trainer
# ---------------------------------------------------------------------------------------------------


def train_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", "configs/demo.yaml", "--data.source", str(data_dir), "--data.generate_synthetic", "false",
            "--data.val_fraction", "0", "--output_dir", str(out), "--model.image_size", "28",
            "--train_batch_size", "8", "--max_train_steps", "8", "--lr_warmup_steps", "1", "--checkpointing_steps", "4",
            "--logging.log_media", "false", "--dataloader_num_workers", "1", *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_two_processes_build_the_same_store_and_training_from_it_matches_the_live_backbone(tmp_path):
    """`atlas-vla cache-features` by 1 and by 2 processes (gloo), with train.py's overrides as train.py takes them
    and after `--`: byte-identical stores. Training from the store
    gives the weights the live backbone gives (up to the store's float16), and a second run skips the build."""
    data = synthetic_dataset(tmp_path, num_episodes=4)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
    command = ["-m", "atlas_vla.cli", "cache-features", "--config", "configs/demo.yaml", "--output"]
    overrides = train_args(data, tmp_path / "unused")[2:]
    # train.py's overrides as train.py takes them, and after `--`: the same store
    for name, processes, given in (("one", ["--num_processes", "1", "--cpu"], overrides),
                                   ("two", ["--multi_gpu", "--num_processes", "2"], ["--", *overrides])):
        result = subprocess.run([*launch, *processes, *command, str(tmp_path / name), *given], cwd=REPO,
                                env=offline_environment(ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"feature store ready: {tmp_path / name}" in result.stdout
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and MANIFEST in names
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name

    from atlas_vla.training.train import main as train_main

    assert train_main(train_args(data, tmp_path / "live")) == 0
    assert train_main(train_args(data, tmp_path / "stored", "--training.feature_store", str(tmp_path / "two"))) == 0
    live, stored = weights(tmp_path / "live" / "final"), weights(tmp_path / "stored" / "final")
    halfway = weights(tmp_path / "live" / "checkpoints" / "checkpoint-4" / "policy")  # how far training moves them
    moved = max(float((live[k] - halfway[k]).abs().max()) for k in live)
    assert max(float((live[k] - stored[k]).abs().max()) for k in live) < 0.05 * moved


@pytest.mark.slow
def test_auto_store_is_reused_and_a_stored_run_resumes_exactly(tmp_path, capsys):
    from atlas_vla.training.train import main as train_main

    data = synthetic_dataset(tmp_path, num_episodes=4)
    shift = ["--training.feature_store", "auto", "--data.random_shift", "2", "--training.cached_copies", "2"]
    runs = tmp_path / "runs"
    assert train_main(train_args(data, runs / "straight", *shift)) == 0
    stores = [p for p in (runs / "feature_stores").iterdir() if p.is_dir()]  # beside it: its lock file
    assert len(stores) == 1 and (stores[0] / MANIFEST).is_file()
    built = {p.name: p.stat().st_mtime_ns for p in stores[0].iterdir()}
    capsys.readouterr()
    assert train_main(train_args(data, runs / "resumed", *shift)) == 0
    log = capsys.readouterr().out  # the trainer logs to stdout
    assert "building the feature store" not in log and f"training on the feature store {stores[0]}" in log
    assert {p.name: p.stat().st_mtime_ns for p in stores[0].iterdir()} == built  # reused, untouched
    import shutil

    shutil.rmtree(runs / "resumed" / "checkpoints" / "checkpoint-8")
    shutil.rmtree(runs / "resumed" / "final")
    assert train_main(train_args(data, runs / "resumed", *shift, "--resume_from_checkpoint", "latest")) == 0
    first, second = weights(runs / "straight" / "final"), weights(runs / "resumed" / "final")
    assert first.keys() == second.keys() and all(bool((first[k] == second[k]).all()) for k in first)
    # another key beside it: its own store
    assert train_main(train_args(data, runs / "other", *shift[:-1], "3")) == 0
    assert len([p for p in (runs / "feature_stores").iterdir() if p.is_dir()]) == 2


def test_samples_for_a_pixel_stem_carry_the_images_each_stored_copy_was_computed_from(setup, tmp_path):
    """`images=True` (a policy with `model.pixel_stem`): each sample's images are shifted exactly as the stored
    copy it reads was, so the backbone's features of those images are the stored ones, in every epoch."""
    _, policy, _, shifted = setup
    store = build(tmp_path / "store", shifted, policy, copies=3)
    stored = StoredFeatureSamples(shifted, store, seed=5, images=True)
    for epoch in (0, 1, 2):
        stored.set_epoch(epoch)
        batch = collate(stored.__getitems__([0, 3, len(stored) - 1]))
        torch.testing.assert_close(batch[OBS_VISION_FEATURES].float(), policy.vision_features(batch[OBS_IMAGES]),
                                   atol=2e-2, rtol=2e-3)  # float16 storage
    assert OBS_IMAGES not in StoredFeatureSamples(shifted, store)[0]
    for samples in (stored, StoredFeatureSamples(shifted, store)):
        torch.testing.assert_close(samples[-1][OBS_VISION_FEATURES], samples[len(samples) - 1][OBS_VISION_FEATURES])
        with pytest.raises(IndexError, match=f"out of range for {len(samples)} samples"):
            samples[len(samples)]
    with pytest.raises(ValueError, match="needs samples that carry images"):
        StoredFeatureSamples(shifted.without_images(), store, images=True)


def test_a_policy_with_a_pixel_stem_trains_from_the_store_as_from_the_live_backbone(tmp_path):
    """`model.pixel_stem` with `training.feature_store`: the trainer hands the stem the samples' images beside the
    stored features, so training gives the weights the live run gives (up to the store's float16), the stem's too."""
    from atlas_vla.training.train import main as train_main

    data = synthetic_dataset(tmp_path, num_episodes=4)
    stem = ["--model.pixel_stem", "true"]
    assert train_main(train_args(data, tmp_path / "live", *stem)) == 0
    assert train_main(train_args(data, tmp_path / "stored", *stem, "--training.feature_store", "auto")) == 0
    live, stored = weights(tmp_path / "live" / "final"), weights(tmp_path / "stored" / "final")
    halfway = weights(tmp_path / "live" / "checkpoints" / "checkpoint-4" / "policy")
    assert live.keys() == stored.keys() and "stem.project.weight" in live
    for name in ("stem.convolutions.0.weight", "stem.project.weight"):
        moved = float((live[name] - halfway[name]).abs().max())
        assert moved > 0 and float((live[name] - stored[name]).abs().max()) < 0.05 * moved, name
