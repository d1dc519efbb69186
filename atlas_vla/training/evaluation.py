"""What the loop measures on the way: validation metrics beside the mean-action baseline, W&B media of
validation samples, and closed-loop success in the LIBERO simulator.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from accelerate import Accelerator

from atlas_vla.config import LoggingConfig
from atlas_vla.constants import ACTIONS, EPISODE_INDEX, INSTRUCTION, OBS_IMAGES
from atlas_vla.data.normalization import NormStats
from atlas_vla.data.samples import collate
from atlas_vla.eval import libero_sim as sim
from atlas_vla.eval.config import EvalConfig
from atlas_vla.eval.failures import check_episodes_ran
from atlas_vla.eval.offline import BASELINE_METRICS, baseline_sums, metric_sums, named_means, policy_means
from atlas_vla.models.policy import AtlasPolicy
from atlas_vla.schema import to_dict
from atlas_vla.training.run import TrainingRun
from atlas_vla.training.tracking import annotate_episode, log_media, log_videos, metrics_table
from atlas_vla.video import write_mp4

logger = logging.getLogger("atlas_vla.train")


def validate(accelerator: Accelerator, policy: torch.nn.Module, loader: Iterable, limit: int | None) -> dict[str, float]:
    """`val/*` metrics over up to `limit` batches per process: each the mean over every valid action step (the
    locate loss: every known coordinate) that any process scored (`metric_sums`), so neither the batch size nor the
    number of processes changes it."""
    sums = _across_processes(accelerator, *metric_sums(policy, loader, limit))
    return policy_means("val/", accelerator.unwrap_model(policy), *sums)


def baseline_metrics(accelerator: Accelerator, loader: Iterable, stats: NormStats, limit: int | None
                     ) -> dict[str, float]:
    """The `val/baseline_*` values, the mean-action baseline's metrics, over the steps `validate` scores."""
    return named_means("val/baseline_", BASELINE_METRICS, *_across_processes(accelerator, *baseline_sums(loader, stats,
                                                                                                       limit)))


def _across_processes(accelerator: Accelerator, totals: torch.Tensor, weights: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and weights of every process, added up."""
    summed = accelerator.reduce(torch.cat([totals, weights]).to(accelerator.device), reduction="sum").cpu()
    return summed[:len(totals)], summed[len(totals):]


def run_validation(run: TrainingRun, baseline: Mapping[str, float], num_batches: int | None) -> None:
    """Log the `val/*` metrics of the policy next to `baseline`, the mean-action baseline's (`val/baseline_*`)."""
    step = run.state.global_step
    val_logs = validate(run.accelerator, run.policy, run.val_loader, num_batches)
    val_logs.update(baseline)
    run.record(val_logs, step)
    logger.info("step %d %s", step, metrics_table(val_logs))


def is_video_validation(validation: int, logging_cfg: LoggingConfig) -> bool:
    """Whether the `validation`-th validation (counted from 1) logs an episode video.

    The 1st does, and then every N-th after it (N = `video_every_validations`): validations
    1, N+1, 2N+1, ...; N = 0 means never.
    """
    every = logging_cfg.video_every_validations
    return every != 0 and (validation - 1) % every == 0


def log_validation_media(run: TrainingRun, validation: int, logging_cfg: LoggingConfig) -> None:
    """W&B images and a table of the first validation samples' actions, and on some validations an episode video.

    Main process and W&B only, and only for an indexable validation split; `validation` counts the
    validations from 1 (see `is_video_validation`).
    """
    samples, accelerator = run.val_samples, run.accelerator
    indexable = not isinstance(samples, torch.utils.data.IterableDataset)
    if not (logging_cfg.log_media and indexable and accelerator.is_main_process and "wandb" in run.trackers):
        return
    step = run.state.global_step
    policy = run.unwrapped_policy
    media = collate([samples[i] for i in range(min(logging_cfg.num_media_samples, len(samples)))])
    video = (_episode_video(policy, samples, run.output_dir / "media" / f"val_episode_{step}.mp4")
             if is_video_validation(validation, logging_cfg) else None)
    log_media(accelerator, step, media[OBS_IMAGES][:, 0], list(media[INSTRUCTION]),
              policy.predict_action_chunk(media), media[ACTIONS], video)


def _episode_video(policy: AtlasPolicy, samples: Any, path: Path, max_frames: int = 120) -> Path | None:
    """An mp4 of the first validation episode's agent view with predicted vs. true actions drawn."""
    frames, true, predicted = [], [], []
    first = None
    for index in range(min(len(samples), max_frames)):
        sample = samples[index]
        if first is None:
            first = sample[EPISODE_INDEX]
        if sample[EPISODE_INDEX] != first:
            break
        batch = collate([sample])
        predicted.append(policy.predict_action_chunk(batch)[0, 0])
        true.append(batch[ACTIONS][0, 0])
        frames.append(batch[OBS_IMAGES][0, 0])
    if not frames:
        return None
    return write_mp4(path, annotate_episode(torch.stack(frames), torch.stack(predicted), torch.stack(true)))


def run_sim_evaluation(run: TrainingRun, eval_cfg: EvalConfig) -> None:
    """Evaluate in the LIBERO simulator on the main process and log `eval/*` and the videos; the other ranks wait.

    A failed evaluation (e.g. every worker died) is logged as an error and skipped: it must not end training.
    """
    accelerator, step = run.accelerator, run.state.global_step
    if accelerator.is_main_process:
        try:
            metrics, videos, run.evaluation = evaluate_in_simulator(run.unwrapped_policy, eval_cfg, run.output_dir,
                                                                    run.references, step)
            run.record(metrics, step)
            log_videos(accelerator, step, videos)
        except Exception as error:
            logger.error("step %d: the LIBERO simulator evaluation failed and is skipped, training "
                         "continues: %s: %s", step, type(error).__name__, error)
    # the other ranks wait here (2 h process-group timeout); after a failed evaluation too
    accelerator.wait_for_everyone()


def evaluate_in_simulator(policy: AtlasPolicy, eval_cfg: EvalConfig, output_dir: Path, references: dict,
                          step: int) -> tuple[dict[str, float], dict[str, str], list[dict[str, Any]]]:
    """Closed-loop LIBERO success rates of the current policy (main process): the `eval/*` scalars, the
    episode videos (logged key -> mp4), as `atlas-vla eval-libero` logs them, and the evaluation in brief, one
    record per suite (`libero_sim.evaluation_records`: suite, episodes, successes, success rate, 95% interval,
    initial states and seed; and the step and the results file).

    An evaluation whose every episode ended in an error (e.g. the simulator cannot render) raises
    `EvaluationFailed` after writing its `results.json`."""
    sim.require_simulator()
    folder = Path(output_dir) / "eval" / f"step-{step}"
    specs = sim.episode_specs(eval_cfg, video_dir=folder / "videos")
    policy_dir = policy.save_pretrained(folder / "policy", references=references)
    results = sim.evaluate(str(policy_dir), specs, num_workers=eval_cfg.num_workers)
    summary = sim.summarize(results)
    settings = {"step": step, "eval": to_dict(eval_cfg)}
    path = sim.save_results(folder / "results.json", eval_cfg.suite, summary, settings)
    check_episodes_ran(results, path)
    metrics = sim.eval_metrics(eval_cfg.suite, summary)
    logger.info("step %d %s", step, metrics_table(metrics))
    records = [{**record, "step": step, "results": str(path)}
               for record in sim.evaluation_records(eval_cfg.suite, summary, settings)]
    return metrics, sim.episode_videos(summary), records
