"""Training: `train(config)` sets up a run, fits it and exports the policy; `main` is `train.py`.

The stages, each in its own module: 1 the accelerator (`accelerator`), 2-5 `setup_run` (`run`: data,
policy + optimizer + schedule, resume, trackers), 6 `fit` (`loop`, with `evaluation` and checkpoints),
7 `export_policy` (`export`). `cache_features` builds a run's feature store without training.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from accelerate import Accelerator

from atlas_vla.config import TrainConfig, config_from_args, usage
from atlas_vla.data.config import check_sources_exist
from atlas_vla.eval.libero_sim import require_simulator
from atlas_vla.models.policy import AtlasPolicy
from atlas_vla.schema import print_renames_as_one_line
from atlas_vla.training.accelerator import build_accelerator
from atlas_vla.training.export import export_policy
from atlas_vla.training.features import prepare_feature_store
from atlas_vla.training.loaders import load_data
from atlas_vla.training.loop import fit
from atlas_vla.training.preemption import StopRequest
from atlas_vla.training.run import setup_run
from atlas_vla.training.tracking import WandbService, check_tracker_installed, sweep_trial_dir, sweep_trial_run_id


def train(config: TrainConfig, *, wandb_run_id: str | None = None) -> Path:
    """Run one training job; returns the folder of the exported policy, or, when a stop signal ended it
    early (`preemption`), the checkpoint it saved (`--resume_from_checkpoint latest` continues from it).

    `wandb_run_id` attaches to an existing W&B run (e.g. the run a sweep agent created). A trial
    started by a W&B sweep agent (`sweep_trial_run_id`) writes into `<output_dir>/sweep-<run id>`,
    because all trials of a sweep share one command line and hence one `--output_dir`.
    """
    trial_id = sweep_trial_run_id()
    if trial_id is not None:
        folder = str(sweep_trial_dir(config.training.output_dir, trial_id))
        config = replace(config, training=replace(config.training, output_dir=folder))
        wandb_run_id = wandb_run_id or trial_id
    # what can be checked fails now, before anything is written
    check_tracker_installed(config.trackers)
    check_sources_exist(config.data)  # a mistyped path is an error naming it, never an empty or synthetic run
    if config.eval.every_steps:
        require_simulator()  # a missing [sim] extra fails now, not at the first evaluation hours later

    # 1. accelerator ------------------------------------------------------------------------------
    accelerator = build_accelerator(config.training, config.logging.log_file, config.trackers)
    service = WandbService()  # started with the trackers; it outlives the stop signals that end this run
    # SIGTERM/SIGINT/SIGUSR1: stop at a step boundary with a checkpoint; the W&B run is finished inside too
    with StopRequest() as stop:
        try:
            return _run_stages(accelerator, config, wandb_run_id, stop, service)  # 2-7
        finally:
            try:
                accelerator.end_training()  # also after an error: trackers are closed, W&B files flushed
            finally:
                service.stop()
                # the run's prepared loaders go now: their worker processes, which ignore stop signals, exit
                # through their own shutdown instead of waiting for a SIGTERM at interpreter exit
                accelerator.free_memory()


def _run_stages(accelerator: Accelerator, config: TrainConfig, wandb_run_id: str | None, stop: StopRequest,
                service: WandbService) -> Path:
    run = setup_run(accelerator, config, wandb_run_id, service)  # 2-5
    throughput = fit(run, stop)  # 6
    if run.stopped_at is not None:
        return run.stopped_at
    return export_policy(run, throughput)  # 7


def main(argv: Sequence[str] | None = None) -> int:
    """`train.py` / `atlas-vla-train` / `python -m atlas_vla.train`: parse, validate, train."""
    argv = list(sys.argv[1:] if argv is None else argv)
    print_renames_as_one_line()
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    try:
        config = config_from_args(argv)
        train(config)
    except (ValueError, OSError) as error:  # bad input, or a save the disk refused: one line, nothing lost
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    return 0


def cache_features(config: TrainConfig, path: str | os.PathLike | None = None) -> Path:
    """`atlas-vla cache-features`: build (or find, when its key matches) the feature store of `config`'s training
    samples without training, at `path` or where `training.feature_store` (default `auto`) puts it. Under
    `accelerate launch` every process encodes its share of the shards."""
    training_cfg = replace(config.training, feature_store=config.training.feature_store or "auto")
    config = replace(config, training=training_cfg)  # validates: a stream or a trainable backbone is refused
    check_sources_exist(config.data)
    accelerator = build_accelerator(training_cfg, None, [])
    train_samples, _, stats = load_data(accelerator, config.data, config.model.sample_spec)
    policy = AtlasPolicy(config.model, stats)
    store = prepare_feature_store(accelerator, policy, train_samples, training_cfg, Path(path) if path else None)
    accelerator.end_training()
    return store.path
