"""Stage 3 of a run: the policy, AdamW and the LR schedule, prepared by Accelerate, and the run's length.

A prepared scheduler steps once per process per update, so it is sized in process-steps; every
checkpoint also exports the policy through a `save_state` pre-hook.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from atlas_vla.config import TrainingConfig
from atlas_vla.data.normalization import NormStats
from atlas_vla.models.config import PolicyConfig
from atlas_vla.models.policy import AtlasPolicy
from atlas_vla.training.loaders import build_loader, build_val_loader

logger = logging.getLogger("atlas_vla.train")


def build_policy(model_cfg: PolicyConfig, training_cfg: TrainingConfig, stats: NormStats,
                 resuming: bool) -> tuple[AtlasPolicy, dict[str, Any], dict[str, int]]:
    """Stage 3a: the policy, the ids and weight hashes of its frozen encoders, and its parameter counts.

    `training.init_from` applies to a new run only: a resumed run's weights come from its checkpoint.
    """
    policy = AtlasPolicy(model_cfg, stats)
    references = policy.backbone_references()  # hash the frozen encoders once
    if training_cfg.init_from and not resuming:
        policy.load_trainable_weights(training_cfg.init_from)
        logger.info("initialised the trainable weights from %s", training_cfg.init_from)
    return policy, references, policy.num_parameters()


class Prepared(NamedTuple):
    """What `accelerator.prepare` returned, and the run length derived from the prepared loader."""

    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    val_loader: Any | None
    max_steps: int
    batches_per_epoch: int | None
    num_epochs: int


def prepare_optimization(accelerator: Accelerator, policy: AtlasPolicy, train_samples: Any, val_samples: Any | None,
                         training_cfg: TrainingConfig, references: dict[str, Any],
                         sampler: torch.utils.data.Sampler | None) -> Prepared:
    """Stage 3b: the loaders, AdamW and the LR schedule, prepared; every checkpoint also exports the policy.

    `sampler` (source-weighted sampling) replaces the shuffled order of the training samples."""
    val_loader = (build_val_loader(val_samples, training_cfg, accelerator.num_processes)
                  if val_samples is not None else None)
    train_loader = build_loader(train_samples, training_cfg, shuffle=True, sampler=sampler)
    optimizer = torch.optim.AdamW(
        _parameter_groups(policy, training_cfg), lr=training_cfg.learning_rate,
        betas=(training_cfg.adam_beta1, training_cfg.adam_beta2), eps=training_cfg.adam_epsilon,
        weight_decay=training_cfg.weight_decay,
    )
    policy, optimizer, train_loader = accelerator.prepare(policy, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    if accelerator.device.type == "cuda" and training_cfg.mixed_precision == "bf16":
        accelerator.unwrap_model(policy).cast_frozen(torch.bfloat16)
    try:
        batches_per_epoch = len(train_loader)
    except TypeError:
        batches_per_epoch = None  # streaming
    max_steps, num_epochs = _run_length(batches_per_epoch, training_cfg)
    scheduler = accelerator.prepare(_schedule(optimizer, training_cfg, max_steps, accelerator.num_processes))

    def export_hook(models: list, weights: list, folder: str) -> None:
        """Every checkpoint also holds the exported policy (`policy/`), loadable without training code."""
        if accelerator.is_main_process:
            accelerator.unwrap_model(models[0]).save_pretrained(Path(folder) / "policy", references=references)

    accelerator.register_save_state_pre_hook(export_hook)
    return Prepared(policy, optimizer, scheduler, train_loader, val_loader, max_steps, batches_per_epoch, num_epochs)


def _parameter_groups(policy: AtlasPolicy, training_cfg: TrainingConfig) -> list[dict[str, Any]]:
    """The trainable parameters as AdamW's groups: with `locate_learning_rate` or `locate_lr_scheduler`, the locating
    ones form a second group, at their own rate (null: `learning_rate`)."""
    trainable = [p for p in policy.parameters() if p.requires_grad]
    group = training_cfg.locate_group()
    if group is None:
        return [{"params": trainable}]
    locating = {id(p) for p in policy.locating_parameters()}
    return [{"params": [p for p in trainable if id(p) not in locating]},
            {"params": [p for p in trainable if id(p) in locating], "lr": group[0]}]


def _schedule(optimizer: torch.optim.Optimizer, training_cfg: TrainingConfig, max_steps: int,
              num_processes: int) -> Any:
    """The LR schedule: `lr_scheduler` for every group, or for the first only when the locating group (the second)
    has a `locate_lr_scheduler` of its own. A prepared scheduler steps once per process per update, so it is sized
    in process-steps."""
    sizes = {"num_warmup_steps": training_cfg.lr_warmup_steps * num_processes,
             "num_training_steps": max_steps * num_processes}
    group = training_cfg.locate_group()
    names = [training_cfg.lr_scheduler, group[1] if group else training_cfg.lr_scheduler]
    if len(optimizer.param_groups) == 1 or names[0] == names[1]:
        return get_scheduler(names[0], optimizer, **sizes)
    # each transformers schedule is a LambdaLR of one factor per update; LambdaLR takes one factor per group
    factors = [get_scheduler(name, optimizer, **sizes).lr_lambdas[0] for name in names]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


# the config's names of the AdamW settings every group holds (its rate: `learning_rate` or `locate_learning_rate`)
_SETTING_NAMES = {"weight_decay": "weight_decay", "eps": "adam_epsilon", "betas": "adam_beta1, adam_beta2"}


def keep_configured_settings(optimizer: torch.optim.Optimizer, scheduler: Any, training_cfg: TrainingConfig
                             ) -> list[str]:
    """After `load_state`: this config's learning rates and AdamW settings in place of the checkpoint's, which torch
    restored with the optimizer's and the schedule's state. The schedule goes on from the update it reached, with
    this config's rates and length. Returns
    "training.key old -> new" for each restored setting that changed."""
    locating = training_cfg.locate_group()
    rates = [training_cfg.learning_rate, locating[0] if locating else training_cfg.learning_rate]
    inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate wraps the torch scheduler
    wanted = {"weight_decay": training_cfg.weight_decay, "eps": training_cfg.adam_epsilon,
              "betas": (training_cfg.adam_beta1, training_cfg.adam_beta2)}
    changed: list[str] = []
    for index, (group, rate) in enumerate(zip(optimizer.param_groups, rates)):
        restored = {"lr": group["initial_lr"]}  # the base rate, which every schedule the config accepts keeps
        restored.update(weight_decay=group["weight_decay"], eps=group["eps"], betas=tuple(group["betas"]))
        for key, old in restored.items():
            value = rate if key == "lr" else wanted[key]
            name = ("learning_rate", "locate_learning_rate")[index] if key == "lr" else _SETTING_NAMES[key]
            line = f"training.{name} {old!r} -> {value!r}"
            if old != value and line not in changed:
                changed.append(line)
        group.update(wanted)
        if isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
            inner.base_lrs[index] = group["initial_lr"] = rate
            group["lr"] = rate * inner.lr_lambdas[index](inner.last_epoch)
    return changed


def _run_length(batches_per_epoch: int | None, training_cfg: TrainingConfig) -> tuple[int, int]:
    """(max_steps, num_epochs): the optimizer updates to run and the epochs they span (a stream: unbounded)."""
    if training_cfg.max_train_steps is None and batches_per_epoch is None:
        raise ValueError("data.streaming is on: set training.max_train_steps (a stream has no epoch length)")
    accumulation = training_cfg.gradient_accumulation_steps
    updates_per_epoch = math.ceil(batches_per_epoch / accumulation) if batches_per_epoch else None
    max_steps = training_cfg.max_train_steps or training_cfg.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch) if updates_per_epoch else sys.maxsize
    return max_steps, num_epochs
