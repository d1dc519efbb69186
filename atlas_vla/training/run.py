"""A training run: `TrainingRun`, everything the loop needs, built by `setup_run` in numbered stages.

`setup_run` runs stages 2-5 on a built accelerator (1): data (`loaders`), policy + optimizer + schedule
(`optimization`, with the feature store of `features` when asked for), resume (`checkpointing`), and
the run's folder and trackers (here). The order of the stages is the order in which random numbers are
drawn.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from atlas_vla.config import TrainConfig, save_config
from atlas_vla.data.feature_store import StoredFeatureSamples
from atlas_vla.data.normalization import NormStats
from atlas_vla.files import write_text_atomic
from atlas_vla.models.policy import AtlasPolicy
from atlas_vla.schema import flatten, to_dict
from atlas_vla.training.artifacts import ArtifactLog, best_metric, run_metadata
from atlas_vla.training.checkpointing import (
    TrainingState,
    apply_retention,
    check_fresh_output_dir,
    check_output_dir,
    resolve_resume,
    resume_state,
)
from atlas_vla.training.features import prepare_feature_store
from atlas_vla.training.loaders import check_one_batch, load_data, source_sampler
from atlas_vla.training.optimization import build_policy, keep_configured_settings, prepare_optimization
from atlas_vla.training.run_folder import METRICS_NAME, RUN_ID_FILE
from atlas_vla.training.tracking import WandbService, new_run_id, wandb_init_kwargs
from atlas_vla.wandb_artifacts import is_wandb_reference, parse_reference

logger = logging.getLogger("atlas_vla.train")


@dataclass
class TrainingRun:
    """Everything `fit` and `export_policy` need, built once by `setup_run`.

    `policy`, `optimizer`, `scheduler` and the loaders are the `accelerator.prepare`d objects;
    `state` is where training stands and is advanced by `fit` (a resumed run starts from its checkpoint's).
    """

    config: TrainConfig  # the resolved config (a sweep trial's output_dir already applied)
    accelerator: Accelerator
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    val_loader: Any | None  # None for an empty validation split
    val_samples: Any | None
    stats: NormStats
    references: dict[str, Any]  # ids and weight hashes of the frozen encoders, saved with every exported policy
    parameter_counts: dict[str, int]
    max_steps: int  # optimizer updates of the whole run
    batches_per_epoch: int | None  # micro-batches per process and epoch; None for a stream
    num_epochs: int  # epochs that `max_steps` spans (sys.maxsize for a stream)
    state: TrainingState = field(default_factory=lambda: TrainingState(global_step=0, epoch=0, batches_in_epoch=0))
    stopped_at: Path | None = None  # the checkpoint saved when a stop signal ended training early
    latest: dict[str, Any] = field(default_factory=dict)  # the last value recorded of every metric
    measured: dict[str, int] = field(default_factory=dict)  # the step each of them was recorded at
    evaluation: list[dict[str, Any]] | None = None  # the last simulator evaluation, per suite: step, rate, interval
    artifacts: ArtifactLog | None = None  # main process with W&B: the artifacts each checkpoint logs

    @property
    def output_dir(self) -> Path:
        return Path(self.config.training.output_dir)

    @property
    def trackers(self) -> list[str]:
        return self.config.trackers

    @property
    def run_id(self) -> str:
        """The W&B run id: kept in the training state so that a resumed run continues the same W&B run."""
        assert self.state.wandb_run_id is not None, "setup_run sets the run id"
        return self.state.wandb_run_id

    @property
    def global_batch_size(self) -> int:
        training_cfg = self.config.training
        return training_cfg.train_batch_size * self.accelerator.num_processes * training_cfg.gradient_accumulation_steps

    @property
    def unwrapped_policy(self) -> AtlasPolicy:
        return self.accelerator.unwrap_model(self.policy)

    def record(self, values: dict[str, Any], step: int) -> None:
        """Send scalars to the trackers and keep a local copy (`metrics.jsonl`) on the main process."""
        self.accelerator.log(values, step=step)
        self.latest.update(values)
        self.measured.update(dict.fromkeys(values, step))
        if self.accelerator.is_main_process:
            with (self.output_dir / METRICS_NAME).open("a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")


def setup_run(accelerator: Accelerator, config: TrainConfig, wandb_run_id: str | None,
              service: WandbService) -> TrainingRun:
    """Stages 2-5 of `train` on a built accelerator: data, policy + optimizer + schedule, resume, trackers
    (W&B through `service`; the caller stops it after `accelerator.end_training()`).

    The order of these stages is the order in which random numbers are drawn; changing it changes
    the trained weights for the same seed.
    """
    output_dir = Path(config.training.output_dir)
    check_output_dir(output_dir)
    with accelerator.local_main_process_first():  # a W&B checkpoint is downloaded once per machine
        resume_dir = resolve_resume(output_dir, config.checkpoint.resume_from_checkpoint)
    _check_resumed_project(config)
    if config.checkpoint.resume_from_checkpoint is None:
        check_fresh_output_dir(output_dir)  # retention would delete the new run's checkpoints, not the old
    train_samples, val_samples, stats = load_data(accelerator, config.data, config.model.sample_spec)  # 2
    check_one_batch(train_samples, config.training.train_batch_size, accelerator.num_processes)
    policy, references, counts = build_policy(config.model, config.training, stats,  # 3
                                              resuming=resume_dir is not None)
    sampler = source_sampler(train_samples, config.data, config.training.seed)
    if config.training.feature_store:
        store = prepare_feature_store(accelerator, policy, train_samples, config.training)
        train_samples = StoredFeatureSamples(train_samples, store, seed=config.training.seed,
                                             images=config.model.pixel_stem)
    prepared = prepare_optimization(accelerator, policy, train_samples, val_samples, config.training, references,
                                    sampler)
    run = TrainingRun(config=config, accelerator=accelerator, policy=prepared.policy, optimizer=prepared.optimizer,
                      scheduler=prepared.scheduler, train_loader=prepared.train_loader,
                      val_loader=prepared.val_loader, val_samples=val_samples, stats=stats, references=references,
                      parameter_counts=counts, max_steps=prepared.max_steps,
                      batches_per_epoch=prepared.batches_per_epoch, num_epochs=prepared.num_epochs)
    run.state = resume_state(accelerator, resume_dir, config.checkpoint, output_dir, config.model, config.training)  # 4
    if resume_dir is not None:
        _keep_configured_settings(run, resume_dir)
    run.state.wandb_run_id = run.state.wandb_run_id or wandb_run_id or new_run_id()
    _start_trackers(run, fresh=resume_dir is None, service=service)  # 5
    return run


def _keep_configured_settings(run: TrainingRun, resume_dir: Path) -> None:
    """Stage 4b: the config's learning rates and AdamW settings replace the ones the checkpoint restored, saying
    which changed (torch restores the saved ones, so a resume with another rate would otherwise keep the old)."""
    changed = keep_configured_settings(run.optimizer, run.scheduler, run.config.training)
    if changed and run.accelerator.is_main_process:
        logger.warning("resuming from %s with settings other than its optimizer's: %s", resume_dir,
                       ", ".join(changed))


def _check_resumed_project(config: TrainConfig) -> None:
    """A checkpoint read from W&B continues its run in the config's `wandb.project` and `entity`: say so when they
    are not the ones the checkpoint came from (the run would then continue in another project)."""
    resume = config.checkpoint.resume_from_checkpoint
    if not is_wandb_reference(resume):
        return
    reference, wandb_cfg = parse_reference(resume), config.wandb
    if reference.project != wandb_cfg.project or (wandb_cfg.entity and reference.entity != wandb_cfg.entity):
        logger.warning("the checkpoint comes from the W&B project %s/%s but this run logs to %s/%s: its W&B run "
                       "continues there (set --wandb.entity and --wandb.project to continue it where it was)",
                       reference.entity, reference.project, wandb_cfg.entity or "(your default entity)",
                       wandb_cfg.project)


def _start_trackers(run: TrainingRun, fresh: bool, service: WandbService) -> None:
    """Stage 5: save the config and statistics, start the local metric log and the trackers, store the run id.

    A `fresh` (not resumed) run starts its local metric log anew; a resumed one appends to it.
    """
    accelerator, config, output_dir, trackers = run.accelerator, run.config, run.output_dir, run.trackers
    training_cfg = config.training
    setup = {"num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
             "mixed_precision": training_cfg.mixed_precision,
             "gradient_accumulation_steps": training_cfg.gradient_accumulation_steps,
             "micro_batch_size": training_cfg.train_batch_size, "global_batch_size": run.global_batch_size,
             "max_train_steps": run.max_steps}
    tracked = {**to_dict(config), "setup": setup, "parameters": run.parameter_counts,
               "norm_stats_fingerprint": run.stats.fingerprint}
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
        run.stats.save(output_dir / "norm_stats.json")
        if fresh:
            (output_dir / METRICS_NAME).write_text("")
        else:  # the steps after the checkpoint are run again: their earlier records go
            _drop_metrics_after(output_dir / METRICS_NAME, run.state.global_step)
            apply_retention(output_dir, config.checkpoint.checkpoints_total_limit)
    if trackers:
        if "wandb" in trackers and accelerator.is_main_process:
            service.start()
        wandb_kwargs = {"wandb": wandb_init_kwargs(config.wandb, output_dir, run.run_id)} if "wandb" in trackers else {}
        accelerator.init_trackers(config.wandb.project, config=flatten(tracked), init_kwargs=wandb_kwargs)
        if "wandb" in trackers and accelerator.is_main_process:
            # inside a sweep wandb ignores the id we pass and uses the agent's: store the id of the run
            # that really exists (the main process alone writes the id file and the checkpoint state)
            run.state.wandb_run_id = accelerator.get_tracker("wandb", unwrap=True).id
            if config.wandb.log_model != "none" or config.wandb.log_checkpoints:
                metric = best_metric(config)  # a resumed run goes on comparing with its best, by the same metric
                best = run.state.best_metric_value if run.state.best_metric == metric else None
                run.artifacts = ArtifactLog(config.wandb, run.run_id, metric,
                                            run_metadata(config, run.stats, run.references), best=best,
                                            suite=config.eval.suite)
    if accelerator.is_main_process:
        write_text_atomic(output_dir / RUN_ID_FILE, run.run_id + "\n")
    logger.info("setup: %s; parameters: %s", setup, run.parameter_counts)


def _drop_metrics_after(path: Path, step: int) -> None:
    """Rewrite `metrics.jsonl` (atomically) without the records of steps after `step`."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))
