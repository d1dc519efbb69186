"""The frozen-feature store, measured: build cost against the bare backbone, training speed from the store
against the live backbone and against features held in RAM, resident memory against the store's size, time to
the first training step when the store is built or reused, and the disk a LIBERO suite needs with VGGT-1B.

    python benchmarks/feature_store.py                      # every part, on ../shared/fixtures/libero/sim_demos*
    python benchmarks/feature_store.py --parts build,train  # some: build, train, train-1b, memory, first-step, disk
    git worktree add ../atlas-vla-ram-cache 9cdfe6d && \
        python benchmarks/feature_store.py --parts train --baseline-code ../atlas-vla-ram-cache

Parts:
- build: the store of `configs/sim_demos.yaml` on `--build-episodes` episodes per source, frames/s of
  `build_store` against the same decode + frozen forward with nothing written (the store's own cost is the
  difference), best of `--repeats` interleaved timings;
- train: `train.py` updates/s with the live backbone, from the store on disk, and from the same store in RAM
  (/dev/shm); with `--baseline-code`, also the in-RAM cache the store replaced, run from a checkout of it;
  and DataLoader samples/s of the store against a tensor held in memory;
- train-1b: the same with the VGGT-1B architecture (random weights), live against a store of its feature shape,
  at batch 4: what the store saves where the backbone is most of the compute, as on a GPU with VGGT-1B;
- memory: peak resident memory (proportional set size of the training process and its DataLoader workers)
  while training one epoch from synthetic stores of about 2 GB and 10 GB;
- first-step: wall time of a one-update run that builds the store, of a second run and of three sweep-style
  trials (one parent folder, other learning rates) that reuse it, and of one with the backbone live;
- disk: bytes per sample and the disk one LIBERO suite needs for `configs/train_config.yaml` (VGGT-1B), and
  the layer, pooling and dtype choices that bring libero_spatial under 100 GB.
Writes everything to `<output-dir>/feature_store.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "libero"
SUITE_FRAMES = {"libero_spatial": 52_970, "libero_object": 66_984, "libero_goal": 52_042, "libero_10": 101_469}
ENV = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
LAUNCH = ["accelerate", "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "train.py"]


def sim_demos_args(sources: list[str], episodes: int, output_dir: Path, *extra: str,
                   config: str = "configs/sim_demos.yaml") -> list[str]:
    """train.py flags: `config` (configs/sim_demos.yaml or a variant of it) on the first `episodes` episodes of
    each source, all of them trained on (no validation split: its final validation would run the backbone live)."""
    return ["--config", config, "--data.source", json.dumps(sources), "--data.max_episodes",
            str(episodes), "--data.val_fraction", "0", "--output_dir", str(output_dir), "--logging.log_media", "false",
            *extra]


def run_training(args: list[str], *, sample_memory: bool = False, repo: Path = REPO) -> dict:
    """Run train.py; its train_summary.json, wall seconds and (optionally) the peak resident memory of its
    process tree (proportional set size: pages the processes share, such as torch's libraries, count once)."""
    import psutil

    start = time.perf_counter()
    process = subprocess.Popen([*LAUNCH, *args], cwd=repo, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    peak, output = [0], []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        if sample_memory:
            try:
                tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_full_info().pss for p in tree if p.is_running()))
            except psutil.Error:
                pass
        time.sleep(0.2)
    reader.join()
    seconds = time.perf_counter() - start
    if process.returncode:
        raise RuntimeError(f"train.py failed:\n{''.join(output)[-3000:]}")
    out_dir = Path(args[args.index("--output_dir") + 1])
    summary = json.loads((out_dir / "train_summary.json").read_text())
    return {"wall_seconds": round(seconds, 1), "steps_per_second": summary["train_steps_per_second"],
            "peak_pss_gb": round(peak[0] / 1e9, 2) if sample_memory else None, "log": "".join(output)}


def part_build(sources: list[str], episodes: int, work: Path, repeats: int) -> dict:
    from atlas_vla.config import load_config
    from atlas_vla.constants import OBS_IMAGES
    from atlas_vla.data.feature_store import FeatureStore, StoreKey, build_store
    from atlas_vla.data.normalization import compute_norm_stats
    from atlas_vla.data.samples import build_samples, collate
    from atlas_vla.data.split import load_train_val
    from atlas_vla.models.policy import AtlasPolicy

    config = load_config(REPO / "configs" / "sim_demos.yaml", {"data": {"source": sources, "max_episodes": episodes}})
    train, _ = load_train_val(config.data)
    policy = AtlasPolicy(config.model, compute_norm_stats(train)).eval()
    samples = build_samples(train, config.model.sample_spec, config.data, train=True)
    copies, batch_size = config.training.cached_copies, config.training.train_batch_size
    frames = len(samples) * copies * config.model.sample_spec.num_views

    def bare_forward() -> None:  # the same decoding, shifting and frozen forward, nothing kept or written
        for _ in range(copies):
            for first in range(0, len(samples), batch_size):
                batch = collate([samples[i] for i in range(first, min(first + batch_size, len(samples)))])
                with torch.no_grad():
                    policy.vision_features(batch[OBS_IMAGES]).half()

    def build() -> None:
        build_store(work / "build_store", samples, policy.vision_features, key, policy.vision_feature_shape(),
                    batch_size=batch_size, progress=False)
        result["store_gb"] = round(FeatureStore(work / "build_store").nbytes / 1e9, 3)
        shutil.rmtree(work / "build_store")

    key = StoreKey.for_policy(policy, samples, copies=copies, device_type="cpu")
    result = {"samples": len(samples), "copies": copies, "frames": frames, "repeats": repeats}
    seconds: dict[str, list[float]] = {"bare": [], "build": []}
    for _ in range(repeats):  # interleaved, so a drift in the machine's speed hits both alike
        for name, run in (("bare", bare_forward), ("build", build)):
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    bare, built = min(seconds["bare"]), min(seconds["build"])
    result.update({"bare_forward_frames_per_s": round(frames / bare, 1), "build_frames_per_s": round(frames / built, 1),
                   "build_overhead_percent": round(100 * (built / bare - 1), 1),
                   "seconds": {name: [round(t, 1) for t in times] for name, times in seconds.items()}})
    return result


def loader_rate(dataset, batches: int, workers: int) -> float:
    from atlas_vla.data.samples import collate

    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True, num_workers=workers, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    def endless():
        while True:
            yield from loader

    iterator = endless()
    next(iterator)  # workers started
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * 32 / (time.perf_counter() - start)


class InMemoryFeatures(torch.utils.data.Dataset):
    """The in-RAM cache the store replaced: every copy of every sample in one tensor, indexed per sample."""

    def __init__(self, stored) -> None:
        store = stored.store
        self.samples = stored.samples
        self.features = torch.stack([torch.stack([store.read(i, c) for c in range(store.copies)])
                                     for i in range(store.num_samples)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitems__(self, indices):
        from atlas_vla.constants import OBS_VISION_FEATURES

        samples = self.samples.__getitems__(indices)
        copies = torch.randint(0, self.features.shape[1], (len(indices),)).tolist()
        for sample, index, copy in zip(samples, indices, copies):
            sample[OBS_VISION_FEATURES] = self.features[index, copy]
        return samples


def in_ram_cache_run(baseline: Path, sources: list[str], episodes: int, work: Path, *args: str) -> dict:
    """configs/sim_demos.yaml trained by `baseline`, a checkout from before the store, whose
    `training.cache_frozen_features` kept every copy of every sample's features in RAM."""
    import yaml

    values = yaml.safe_load((REPO / "configs" / "sim_demos.yaml").read_text())
    del values["training"]["feature_store"]
    values["training"]["cache_frozen_features"] = True
    config = work / "in_ram_cache.yaml"
    config.write_text(yaml.safe_dump(values))
    return run_training(sim_demos_args(sources, episodes, work / "in_ram_cache", *args, config=str(config)),
                        repo=baseline)


def part_train(sources: list[str], episodes: int, work: Path, steps: int, live_steps: int,
               baseline: Path | None) -> dict:
    result = {}
    store = work / "train_store"
    common = ("--dataloader_num_workers", "1", "--validation_steps", "100000", "--checkpointing_steps", "100000",
              "--lr_warmup_steps", "10")
    live = run_training(sim_demos_args(sources, episodes, work / "live", "--max_train_steps", str(live_steps),
                                       "--training.feature_store", "null", "--training.cached_copies", "1", *common))
    on_disk = run_training(sim_demos_args(sources, episodes, work / "stored", "--max_train_steps", str(steps),
                                          "--training.feature_store", str(store), *common))
    ram_store = Path("/dev/shm") / f"atlas_vla_store_{os.getpid()}"
    shutil.copytree(store, ram_store)
    try:
        in_ram = run_training(sim_demos_args(sources, episodes, work / "stored_ram", "--max_train_steps", str(steps),
                                             "--training.feature_store", str(ram_store), *common))
    finally:
        shutil.rmtree(ram_store, ignore_errors=True)
    rates = {"live_backbone": live["steps_per_second"], "store_on_disk": on_disk["steps_per_second"],
             "store_in_ram": in_ram["steps_per_second"]}
    if baseline is not None:
        rates["in_ram_cache"] = in_ram_cache_run(baseline, sources, episodes, work, "--max_train_steps", str(steps),
                                                 *common)["steps_per_second"]
        result["store_vs_in_ram_cache"] = round(rates["store_on_disk"] / rates["in_ram_cache"], 3)
    result["updates_per_s"] = {name: round(rate, 3) for name, rate in rates.items()}
    result["store_vs_live"] = round(rates["store_on_disk"] / rates["live_backbone"], 1)
    result["disk_vs_ram"] = round(rates["store_on_disk"] / rates["store_in_ram"], 3)

    from atlas_vla.config import load_config
    from atlas_vla.data.feature_store import FeatureStore, StoredFeatureSamples
    from atlas_vla.data.samples import build_samples
    from atlas_vla.data.split import load_train_val

    config = load_config(REPO / "configs" / "sim_demos.yaml",
                         {"data": {"source": sources, "max_episodes": episodes, "val_fraction": 0.0}})
    train, _ = load_train_val(config.data)
    stored = StoredFeatureSamples(build_samples(train, config.model.sample_spec, config.data, train=True),
                                  FeatureStore(store))
    memory = InMemoryFeatures(stored)
    result["loader_samples_per_s"] = {f"{name}_{workers}_workers": round(loader_rate(data, 100, workers), 1)
                                      for name, data in (("store", stored), ("in_memory_tensor", memory))
                                      for workers in (0, 1)}
    return result


def random_features(shape: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """An `encode` for `build_store` that returns seeded random features of `shape` per sample: a store whose
    contents do not matter (its size, or the speed of training from it, is what is measured)."""
    generator = torch.Generator().manual_seed(0)
    return lambda images: torch.randn((len(images), *shape), generator=generator)


def part_train_1b(sources: list[str], work: Path, live_steps: int, steps: int, batch_size: int = 4) -> dict:
    """updates/s of configs/sim_demos.yaml with the VGGT-1B architecture (random weights; the speed is the same)
    with the backbone live against from a store of the 1B's feature shape. The store holds random values:
    building a real one would take hours on a CPU, and a step from it costs the same whatever it holds."""
    import yaml

    from atlas_vla.config import load_config
    from atlas_vla.data.feature_store import StoreKey, build_store
    from atlas_vla.data.normalization import compute_norm_stats
    from atlas_vla.data.samples import build_samples
    from atlas_vla.data.split import load_train_val
    from atlas_vla.models.policy import AtlasPolicy

    values = yaml.safe_load((REPO / "configs" / "sim_demos.yaml").read_text())
    for key in ("vggt", "vggt_layers"):
        del values["model"][key]
    values["model"]["vggt_pretrained"] = None  # the 1B architecture, randomly initialised (no Hub here)
    values["training"]["cached_copies"] = 1
    config_path = work / "sim_demos_vggt_1b.yaml"
    config_path.write_text(yaml.safe_dump(values))
    store = work / "store_vggt_1b"
    common = ("--train_batch_size", str(batch_size), "--dataloader_num_workers", "1", "--validation_steps", "100000",
              "--checkpointing_steps", "100000", "--lr_warmup_steps", "1")
    live = run_training(sim_demos_args(sources, 2, work / "live_1b", "--max_train_steps", str(live_steps),
                                       "--training.feature_store", "null", "--logging.log_every_steps", "1", *common,
                                       config=str(config_path)))

    config = load_config(config_path, {"data": {"source": sources, "max_episodes": 2, "val_fraction": 0.0}})
    train, _ = load_train_val(config.data)
    policy = AtlasPolicy(config.model, compute_norm_stats(train))
    samples = build_samples(train, config.model.sample_spec, config.data, train=True)
    shape = policy.vision_feature_shape()
    key = StoreKey.for_policy(policy, samples, copies=1, device_type="cpu")
    del policy
    built = build_store(store, samples, random_features(shape), key, shape, progress=False)
    stored = run_training(sim_demos_args(sources, 2, work / "stored_1b", "--max_train_steps", str(steps),
                                         "--training.feature_store", str(store), *common, config=str(config_path)))
    rates = {"live_backbone": round(live["steps_per_second"], 4), "store_on_disk": round(stored["steps_per_second"], 3)}
    return {"batch_size": batch_size, "sample_mb": round(built.sample_bytes / 1e6, 2),
            "updates_per_s": rates, "store_vs_live": round(rates["store_on_disk"] / rates["live_backbone"], 1)}


def part_memory(work: Path, sizes_gb: list[float]) -> dict:
    """Synthetic stores (random features, no backbone pass) of each size; one epoch of training from each.

    Many copies per sample make a large store out of few samples, so an epoch (which reads every sample
    once, each time from one copy) stays short while the file it reads from grows."""
    import yaml

    from atlas_vla.config import load_config
    from atlas_vla.data.feature_store import StoreKey, build_store
    from atlas_vla.data.normalization import compute_norm_stats
    from atlas_vla.data.samples import build_samples
    from atlas_vla.data.split import load_train_val
    from atlas_vla.data.synthetic import make_synthetic_libero
    from atlas_vla.models.policy import AtlasPolicy

    copies, probe_episodes = 16, 8

    def setup(name: str, episodes: int) -> tuple[Path, Any, Any, list[int]]:
        data = make_synthetic_libero(work / f"data_{name}", num_episodes=episodes, image_size=64)
        values = {"model": {"image_size": 224, "action_horizon": 4, "vggt_pretrained": None, "vggt_layers": [0, 1],
                            "vggt": {"embed_dim": 64, "depth": 2, "num_heads": 4,
                                     "dino": {"embed_dim": 64, "depth": 2, "num_heads": 4}},
                            "language": {"model_name_or_path": "minilm"},
                            "fusion": {"hidden_dim": 64, "num_heads": 4, "encoder_depth": 1, "decoder_depth": 1}},
                  "data": {"source": str(data), "val_fraction": 0.0, "random_shift": 2},
                  "training": {"train_batch_size": 32, "num_train_epochs": 1, "lr_warmup_steps": 10,
                               "cached_copies": copies, "feature_store": str(work / f"store_{name}"),
                               "dataloader_num_workers": 2, "validate_every_steps": 100000},
                  "checkpoint": {"save_every_steps": 100000}, "logging": {"log_media": False}}
        config_path = work / f"memory_{name}.yaml"
        config_path.write_text(yaml.safe_dump(values))
        config = load_config(config_path)
        train, _ = load_train_val(config.data)
        policy = AtlasPolicy(config.model, compute_norm_stats(train))
        samples = build_samples(train, config.model.sample_spec, config.data, train=True)
        return config_path, policy, samples, list(policy.vision_feature_shape())

    _, _, probe_samples, shape = setup("probe", probe_episodes)
    sample_bytes = copies * 2 * int(torch.Size(shape).numel())  # float16
    samples_per_episode = len(probe_samples) / probe_episodes
    result = {}
    for size in sizes_gb:
        name = f"{size:g}gb"
        episodes = max(2, round(size * 1e9 / sample_bytes / samples_per_episode))
        config_path, policy, samples, shape = setup(name, episodes)
        key = StoreKey.for_policy(policy, samples, copies=copies, device_type="cpu")
        store = build_store(work / f"store_{name}", samples, random_features(shape), key, shape, progress=False)
        run = run_training(["--config", str(config_path), "--output_dir", str(work / f"memory_run_{name}")],
                           sample_memory=True)
        result[name] = {"store_gb": round(store.nbytes / 1e9, 2), "samples": len(samples), "copies": copies,
                        "peak_pss_gb": run["peak_pss_gb"], "updates_per_s": round(run["steps_per_second"], 2)}
        shutil.rmtree(work / f"store_{name}")
        shutil.rmtree(work / f"data_{name}")
    return result


def part_first_step(sources: list[str], episodes: int, work: Path) -> dict:
    parent = work / "sweep"
    one = ("--max_train_steps", "1", "--validation_steps", "100000", "--lr_warmup_steps", "1")
    result = {"builds": run_training(sim_demos_args(sources, episodes, parent / "first", *one))["wall_seconds"],
              "reuses": run_training(sim_demos_args(sources, episodes, parent / "second", *one))["wall_seconds"]}
    result["sweep_trials"] = [run_training(sim_demos_args(sources, episodes, parent / f"sweep-trial{i}", *one,
                                                          "--learning_rate", str(lr)))["wall_seconds"]
                              for i, lr in enumerate((1e-4, 3e-4, 1e-3))]
    result["live_backbone"] = run_training(sim_demos_args(sources, episodes, parent / "live", *one,
                                                          "--training.feature_store", "null",
                                                          "--training.cached_copies", "1"))["wall_seconds"]
    return result


def part_disk() -> dict:
    """Bytes per sample of configs/train_config.yaml (VGGT-1B) and a few cheaper choices, for each suite."""
    from atlas_vla.config import load_config

    model = load_config(REPO / "configs" / "train_config.yaml").model
    views = model.sample_spec.num_views
    width = 2 * model.vggt.embed_dim
    patches = (model.image_size // 14) ** 2

    def per_sample(layers: int, pool: int | None, bytes_per_value: int) -> int:
        tokens = 1 + (pool * pool if pool else patches)
        return layers * views * tokens * width * bytes_per_value

    choices = {
        f"train_config: {len(model.vggt_layers)} layers, pool {model.fusion.spatial_pool}, float16":
            per_sample(len(model.vggt_layers), model.fusion.spatial_pool, 2),
        f"no pooling ({patches} patches), {len(model.vggt_layers)} layers, float16":
            per_sample(len(model.vggt_layers), None, 2),
        "3 layers, pool 8, float16": per_sample(3, 8, 2),
        f"{len(model.vggt_layers)} layers, pool 6, float16": per_sample(len(model.vggt_layers), 6, 2),
        f"{len(model.vggt_layers)} layers, pool 4, float16": per_sample(len(model.vggt_layers), 4, 2),
        f"{len(model.vggt_layers)} layers, pool 8, 8-bit": per_sample(len(model.vggt_layers), 8, 1),
    }
    return {name: {"mb_per_sample": round(size / 1e6, 2),
                   **{f"{suite}_gb": round(size * frames / 1e9, 1) for suite, frames in SUITE_FRAMES.items()}}
            for name, size in choices.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="build,train,train-1b,memory,first-step,disk")
    parser.add_argument("--data", action="append", default=None,
                        help=f"sources (default: {FIXTURES}/sim_demos and sim_demos_more)")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per source (train, first-step)")
    parser.add_argument("--build-episodes", type=int, default=5, help="episodes per source (build)")
    parser.add_argument("--repeats", type=int, default=2, help="timings of the bare forward and of the build (build)")
    parser.add_argument("--steps", type=int, default=300, help="updates timed from the store")
    parser.add_argument("--live-steps", type=int, default=30, help="updates timed with the live backbone")
    parser.add_argument("--baseline-code", default=None,
                        help="train: also time the in-RAM cache the store replaced, from a checkout of it "
                             "(git worktree add ../atlas-vla-ram-cache 9cdfe6d)")
    parser.add_argument("--live-steps-1b", type=int, default=3, help="train-1b: updates timed with VGGT-1B live")
    parser.add_argument("--steps-1b", type=int, default=60, help="train-1b: updates timed from the store")
    parser.add_argument("--memory-gb", default="2,10", help="synthetic store sizes for the memory part")
    parser.add_argument("--output-dir", default=str(REPO / "outputs" / "benchmark_feature_store"))
    args = parser.parse_args()
    sources = args.data or [str(FIXTURES / "sim_demos"), str(FIXTURES / "sim_demos_more")]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        work = Path(tmp)
        for part in args.parts.split(","):
            start = time.perf_counter()
            if part == "build":
                results[part] = part_build(sources, args.build_episodes, work, args.repeats)
            elif part == "train":
                results[part] = part_train(sources, args.episodes, work, args.steps, args.live_steps,
                                           args.baseline_code and Path(args.baseline_code))
            elif part == "train-1b":
                results[part] = part_train_1b(sources, work, args.live_steps_1b, args.steps_1b)
            elif part == "memory":
                results[part] = part_memory(work, [float(s) for s in args.memory_gb.split(",")])
            elif part == "first-step":
                results[part] = part_first_step(sources, args.episodes, work)
            elif part == "disk":
                results[part] = part_disk()
            else:
                parser.error(f"unknown part {part!r}; expected build, train, train-1b, memory, first-step or disk")
            print(f"{part} ({time.perf_counter() - start:.0f} s):", json.dumps(results[part], indent=2), flush=True)
    (out / "feature_store.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'feature_store.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
