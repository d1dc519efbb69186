"""Stage 7 of a run: the final policy in `final/`, `train_summary.json`, and the Hub upload if asked for."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from atlas_vla.files import write_json_atomic
from atlas_vla.models.pretrained import push_policy_folder
from atlas_vla.training.loop import Throughput
from atlas_vla.training.model_card import write_model_card
from atlas_vla.training.run import TrainingRun
from atlas_vla.training.run_folder import FINAL_DIR, SUMMARY_NAME

logger = logging.getLogger("atlas_vla.train")


def export_policy(run: TrainingRun, throughput: Throughput) -> Path:
    """Stage 7 of `train`: the final policy in `final/`, `train_summary.json`, and the Hub upload (with its model
    card) if asked for."""
    accelerator, output_dir, training_cfg = run.accelerator, run.output_dir, run.config.training
    checksums = _rank_checksums(accelerator, run.unwrapped_policy)
    final_dir = output_dir / FINAL_DIR
    if accelerator.is_main_process:
        policy = run.unwrapped_policy
        policy.save_pretrained(final_dir, references=run.references)
        summary = {"global_step": run.state.global_step, "num_processes": accelerator.num_processes,
                   "global_batch_size": run.global_batch_size, "rank_weight_checksums": checksums,
                   "wandb_run_id": run.run_id if "wandb" in run.trackers else None,
                   "parameters": run.parameter_counts, "seconds": time.perf_counter() - throughput.start,
                   "train_steps_per_second": throughput.steps_per_second}
        write_json_atomic(output_dir / SUMMARY_NAME, summary)
        logger.info("exported the policy to %s", final_dir)
        if training_cfg.push_to_hub:
            push_final_policy(final_dir, training_cfg.hub_model_id or output_dir.name, run.evaluation,
                              run.state.global_step)
    accelerator.wait_for_everyone()
    return final_dir


def push_final_policy(final_dir: Path, repo_id: str, evaluation: list[dict] | None, step: int) -> None:
    """`--push_to_hub`: the model card (with the run's simulator evaluation when it measured this final `step`) and
    the upload. A card or an upload that fails is an error line with the command that retries it; the policy stays
    in `final/` and the run ends as it would have."""
    results = sorted({record["results"] for record in evaluation or [] if record.get("step") == step})
    try:
        write_model_card(final_dir, results, repo_id=repo_id)
        logger.info("pushed the policy to the Hub: %s", push_policy_folder(final_dir, repo_id))
    except (OSError, ValueError) as error:  # ConnectionError is an OSError
        logger.error("%s; the policy is in %s: upload it later with `atlas-vla push %s --repo-id %s`", error,
                     final_dir, final_dir, repo_id)


def _rank_checksums(accelerator: Accelerator, policy: torch.nn.Module) -> list[float]:
    """One checksum of the trainable weights per rank (they must all agree under DDP)."""
    total = sum(p.detach().double().sum() for p in policy.parameters())
    return [float(v) for v in accelerator.gather(total.reshape(1).to(accelerator.device).float())]
