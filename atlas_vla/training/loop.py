"""Stage 6 of a run: `fit`, the optimizer updates and, after each, whatever is due.

One optimizer update is one `global_step`; it is the step of every logged value, of checkpoint names
and of the LR schedule, on any number of processes and with any gradient accumulation.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from tqdm.auto import tqdm

from atlas_vla.config import CheckpointConfig, LoggingConfig, TrainingConfig, config_yaml
from atlas_vla.constants import SOURCE_INDEX
from atlas_vla.eval.config import EvalConfig
from atlas_vla.eval.offline import LOSS_PARTS, POSITION_METRICS, known_coordinates, policy_means, valid_steps
from atlas_vla.training.checkpointing import TrainingState, checkpoints_dir, save_checkpoint
from atlas_vla.training.evaluation import (
    baseline_metrics,
    log_validation_media,
    run_sim_evaluation,
    run_validation,
)
from atlas_vla.training.preemption import StopRequest, record_stop, wait_for_test
from atlas_vla.training.run import TrainingRun
from atlas_vla.training.run_folder import record_policy_version

logger = logging.getLogger("atlas_vla.train")


@dataclass
class TrainWindow:
    """What the micro-batches since the last `train/*` log saw on this process: their losses weighed by their
    valid action steps, the locate loss by its known coordinates (the logged value is the mean over every such step
    or coordinate of every process, as for `val/*`)
    and, with several data sources, how many samples came from each (`train/samples/source_<i>`)."""

    num_sources: int = 1
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor | float] = field(default_factory=dict)
    source_samples: torch.Tensor | None = None

    def add(self, out: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> None:
        steps = valid_steps(batch).to(out["loss"].device)
        coordinates = known_coordinates(batch).to(out["loss"].device)
        for key in LOSS_PARTS:
            weight = coordinates if key in POSITION_METRICS else steps
            self.sums[key] = self.sums.get(key, 0) + out[key].detach().float() * weight
            self.weights[key] = self.weights.get(key, 0) + weight
        if SOURCE_INDEX in batch:
            drawn = torch.bincount(torch.as_tensor(batch[SOURCE_INDEX]).cpu(), minlength=self.num_sources)
            self.source_samples = drawn if self.source_samples is None else self.source_samples + drawn

    def totals(self) -> torch.Tensor:
        """This process's weighted sum of each of `LOSS_PARTS` and then their weights (valid action steps; for the
        locate loss, known coordinates): one tensor that sums over processes into the means of the whole run
        (`means_of`)."""
        return torch.stack([*(self.sums[key] for key in LOSS_PARTS),
                            *(torch.as_tensor(self.weights[key]).to(self.sums[key]) for key in LOSS_PARTS)])

    @staticmethod
    def means_of(totals: torch.Tensor, policy: Any) -> dict[str, float]:
        """`train/*` losses from `totals` (summed over processes or not): each part's mean and the loss made of them
        (`eval.offline.policy_means`); a part nothing scored is left out."""
        return policy_means("train/", policy, *totals.cpu().split(len(LOSS_PARTS)))

    def reset(self) -> None:
        self.sums, self.weights, self.source_samples = {}, {}, None


@dataclass
class Throughput:
    """Optimizer updates per second of this process's loop (a resumed run counts from its first step)."""

    first_step: int
    start: float = field(default_factory=time.perf_counter)
    steps_per_second: float = 0.0  # as last measured

    def measure(self, step: int) -> float:
        self.steps_per_second = (step - self.first_step) / max(time.perf_counter() - self.start, 1e-9)
        return self.steps_per_second


def fit(run: TrainingRun, stop: StopRequest | None = None) -> Throughput:
    """Stage 6 of `train`: optimizer updates until `run.max_steps`, and after each what is due.

    Every micro-batch is one forward/backward; every `gradient_accumulation_steps` of them make one
    optimizer update (`global_step`), after which the train metrics are logged, the policy is
    validated, evaluated in the simulator and checkpointed, each at its own interval. When a rank
    received a stop signal, every rank stops after the same update with a checkpoint (`stop_training`).
    """
    config, state, max_steps = run.config, run.state, run.max_steps
    baseline = (baseline_metrics(run.accelerator, run.val_loader, run.stats, config.training.num_validation_batches)
                if run.val_loader is not None else {})
    progress = tqdm(total=max_steps, initial=state.global_step, desc="train",
                    disable=not run.accelerator.is_local_main_process)
    window = TrainWindow(num_sources=len(config.data.sources))
    validations = 0
    throughput = Throughput(first_step=state.global_step)
    run.policy.train()
    if stop is not None:
        stop.training = True
    for batch in _train_batches(run):
        out = update_policy(run, batch, config.training.max_grad_norm)
        state.batches_in_epoch += 1
        window.add(out, batch)
        if not run.accelerator.sync_gradients:
            continue  # a micro-batch of an update that is still accumulating gradients
        state.global_step += 1
        progress.update(1)
        step = state.global_step
        if is_log_step(step, max_steps, config.logging):
            log_train_metrics(run, window, throughput, progress)
        if run.val_loader is not None and is_validation_step(step, max_steps, config.training):
            validations += 1
            run_validation(run, baseline, config.training.num_validation_batches)
            log_validation_media(run, validations, config.logging)
        if is_sim_eval_step(step, config.eval):
            run_sim_evaluation(run, config.eval)
        saved = is_checkpoint_step(step, max_steps, config.checkpoint)
        if saved:
            save_training_checkpoint(run, config.checkpoint)
        if step >= max_steps:
            break
        if stop is not None:
            wait_for_test(step, run.output_dir, stop, run.accelerator.process_index)
            if stop.agreed(run.accelerator):
                stop_training(run, stop, saved)
                break
    progress.close()
    return throughput


def _train_batches(run: TrainingRun) -> Iterator[Any]:
    """The training micro-batches from where `run.state` stands until training ends, epoch after epoch.

    A resumed run first skips the batches its epoch had already consumed. Each exhausted epoch
    advances `run.state` to the next one; the caller stops iterating after the last update.
    """
    state = run.state
    while state.global_step < run.max_steps and state.epoch < run.num_epochs:
        if hasattr(run.train_loader, "set_epoch"):
            run.train_loader.set_epoch(state.epoch)
        if hasattr(run.train_loader.dataset, "set_epoch"):  # Accelerate skips it when the sampler has one
            run.train_loader.dataset.set_epoch(state.epoch)
        if state.batches_in_epoch:
            yield from run.accelerator.skip_first_batches(run.train_loader, state.batches_in_epoch)
        else:
            yield from run.train_loader
        state.epoch += 1
        state.batches_in_epoch = 0


def update_policy(run: TrainingRun, batch: Mapping[str, Any], max_grad_norm: float | None) -> dict[str, torch.Tensor]:
    """Forward and backward one micro-batch; returns the policy's losses.

    On several processes the gradient is that of the mean over every valid action step (for the locate loss, every
    known coordinate) of all processes' micro-batches, as one process with their union would compute
    (`process_share`). Under
    `accelerator.accumulate` the gradients are clipped and the optimizer, the schedule and the zeroing take
    effect only on the micro-batch that completes an update (`sync_gradients`).
    """
    accelerator = run.accelerator
    with accelerator.accumulate(run.policy):
        out = run.policy(batch)
        if accelerator.num_processes == 1:
            accelerator.backward(out["loss"])
        else:
            policy = accelerator.unwrap_model(run.policy)
            acting = policy.combined_loss(out["pose_loss"], out["gripper_loss"], 0.0)
            locating = policy.combined_loss(0.0, 0.0, out["locate_loss"])
            steps, coordinates = process_share(accelerator, torch.stack([valid_steps(batch), known_coordinates(batch)]))
            accelerator.backward(acting * steps + locating * coordinates)
        if accelerator.sync_gradients and max_grad_norm:
            accelerator.clip_grad_norm_(run.policy.parameters(), max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return out


def process_share(accelerator: Any, weight: torch.Tensor) -> torch.Tensor:
    """This process's `weight` (its valid action steps, its known coordinates, or both stacked) over the mean of all
    processes': the factor that turns its loss (a mean over its own steps) into its part of the mean over
    everyone's, once DDP averages the gradients.

    Without it a process whose micro-batch ends more episodes (more padded steps) would weigh each of its
    steps more, and two processes of 8 would not train as one of 16."""
    weight = weight.to(accelerator.device)
    return weight / accelerator.reduce(weight, "mean").clamp(min=1)


def is_log_step(step: int, max_steps: int, logging_cfg: LoggingConfig) -> bool:
    """`train/*` metrics every `log_every_steps` updates and after the last one."""
    return step % logging_cfg.log_every_steps == 0 or step == max_steps


def is_validation_step(step: int, max_steps: int, training_cfg: TrainingConfig) -> bool:
    """Validation every `validate_every_steps` updates and after the last one."""
    return step % training_cfg.validate_every_steps == 0 or step == max_steps


def is_sim_eval_step(step: int, eval_cfg: EvalConfig) -> bool:
    """Simulator evaluation every `every_steps` updates (not at the end); never when it is unset."""
    return bool(eval_cfg.every_steps) and step % eval_cfg.every_steps == 0


def is_checkpoint_step(step: int, max_steps: int, checkpoint_cfg: CheckpointConfig) -> bool:
    """A checkpoint every `save_every_steps` updates and after the last one."""
    return step % checkpoint_cfg.save_every_steps == 0 or step == max_steps


def log_train_metrics(run: TrainingRun, window: TrainWindow, throughput: Throughput, progress: tqdm) -> None:
    """Log the `train/*` metrics: losses averaged over the valid action steps (the locate loss over the known
    coordinates) since the last log on every process,
    and with several sources the samples each gave since then, summed over processes (what the run trained on)."""
    state = run.state
    step = state.global_step
    logs = window.means_of(run.accelerator.reduce(window.totals(), "sum"), run.accelerator.unwrap_model(run.policy))
    rates = run.scheduler.get_last_lr()
    if len(rates) > 1:  # the locating parameters' group (`training.locate_learning_rate`, `locate_lr_scheduler`)
        logs["train/locate_lr"] = rates[1]
    logs.update({"train/lr": rates[0], "train/step": step,
                 "train/epoch": state.epoch + state.batches_in_epoch / (run.batches_per_epoch or math.inf),
                 "train/steps_per_second": throughput.measure(step)})
    if window.source_samples is not None:  # every rank has them, or none does
        drawn = run.accelerator.reduce(window.source_samples.to(run.accelerator.device), "sum")
        logs.update({f"train/samples/source_{i}": int(count) for i, count in enumerate(drawn.tolist())})
    run.record(logs, step)  # custom metrics: add them to `logs` here
    progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
    window.reset()


def save_training_checkpoint(run: TrainingRun, checkpoint_cfg: CheckpointConfig) -> Path:
    """Save `checkpoints/checkpoint-{step}` with the state a resumed run continues from, apply retention, and log
    the W&B artifacts `wandb.log_model` / `log_checkpoints` ask for (`artifacts.ArtifactLog`)."""
    state = run.state
    step = state.global_step
    is_best = run.artifacts.consider(run.latest) if run.artifacts is not None else False
    best = ((run.artifacts.metric, run.artifacts.best) if run.artifacts is not None
            else (state.best_metric, state.best_metric_value))
    saved = TrainingState(step, state.epoch, state.batches_in_epoch, run.run_id, *best)
    if state.batches_in_epoch == run.batches_per_epoch:  # this update ended the epoch: resume at the next one
        saved = TrainingState(step, state.epoch + 1, 0, run.run_id, *best)
    folder = save_checkpoint(run.accelerator, run.output_dir, saved, checkpoint_cfg.checkpoints_total_limit,
                             {"config.yaml": config_yaml(run.config)})
    if run.artifacts is not None:
        aliases = run.artifacts.after_checkpoint(run.accelerator.get_tracker("wandb", unwrap=True), folder, step,
                                                 final=step >= run.max_steps, is_best=is_best, metrics=run.latest,
                                                 measured=run.measured, evaluation=run.evaluation)
        if aliases is not None:  # what eval-watch attaches its results to, and what a model card names
            record_policy_version(run.output_dir, step, aliases)
    return folder


def stop_training(run: TrainingRun, stop: StopRequest, saved: bool) -> None:
    """Every rank, after the update at which they agreed to stop: checkpoint this step (unless `saved`
    already), mark the W&B run as preempting and tell `launch.sh`; `train` then closes the trackers."""
    step = run.state.global_step
    folder = (checkpoints_dir(run.output_dir) / f"checkpoint-{step}" if saved
              else save_training_checkpoint(run, run.config.checkpoint))
    run.stopped_at = folder
    if run.accelerator.is_main_process:
        if "wandb" in run.trackers:
            run.accelerator.get_tracker("wandb", unwrap=True).mark_preempting()
        message = (f"stopped by {stop.describe()} after step {step} of {run.max_steps}; checkpoint saved in {folder}; "
                   f"continue with --resume_from_checkpoint latest")
        logger.warning(message)
        record_stop(message)
