"""Offline evaluation: the training loop's `val/*` metrics of a policy on any LIBERO dataset split."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from atlas_vla.action_layout import GRIPPER, binarize_gripper
from atlas_vla.constants import ACTIONS, ACTIONS_PAD_MASK, OBJECT_POSITIONS
from atlas_vla.data.config import DataConfig
from atlas_vla.data.normalization import NormStats
from atlas_vla.files import write_json_atomic
from atlas_vla.models.action_head import action_metrics

VAL_METRICS = ("loss", "pose_loss", "gripper_loss", "locate_loss", "pose_l2_error", "pose_l1_error", "gripper_error",
               "pose_l1_error_normalized", "pose_l2_error_normalized")
LOSS_PARTS = ("pose_loss", "gripper_loss", "locate_loss")  # what `AtlasPolicy.combined_loss` makes the loss of
SUMMED_METRICS = VAL_METRICS[1:]  # summed over batches; "loss" is made from its parts' means (`policy_means`)
POSITION_METRICS = ("locate_loss",)  # means over the positions a batch knows; every other metric over action steps
BASELINE_METRICS = ("pose_l1_error", "pose_l2_error", "gripper_error")  # `action_metrics` of the mean action


def valid_steps(batch: Mapping[str, Any]) -> torch.Tensor:
    """How many action steps of a batch are real (not the padding after an episode's end, nor a frame without an
    action): the weight of its action metrics, each a mean over those steps. A float tensor on the batch's device
    (reading it does not wait for one)."""
    return (~torch.as_tensor(batch[ACTIONS_PAD_MASK])).sum().float()


def known_coordinates(batch: Mapping[str, Any]) -> torch.Tensor:
    """How many `OBJECT_POSITIONS` coordinates a batch knows (finite): the weight of its `POSITION_METRICS`, each a
    mean over those coordinates; zero for a batch without positions."""
    positions = batch.get(OBJECT_POSITIONS)
    return torch.isfinite(torch.as_tensor(positions)).sum().float() if positions is not None else torch.zeros(())


def scored_samples(samples: Any, count: int | None) -> Any:
    """The part of a validation split that a validation limited to `count` samples scores: `count` samples spread
    evenly over the whole split, in order, the same at every validation.

    Samples run in episode order, so the first `count` would cover the first few validation episodes only, and a
    limited validation would measure those episodes rather than the split. A streamed split (no length) and one of
    at most `count` samples are scored as they are."""
    if count is None or isinstance(samples, torch.utils.data.IterableDataset) or len(samples) <= count:
        return samples
    # spaced at least one apart, so the rounded positions are distinct; they run from the first sample to the last
    positions = np.linspace(0, len(samples) - 1, count).round().astype(int)
    return torch.utils.data.Subset(samples, positions.tolist())


def _weighted_sums(batches: Iterable[Mapping[str, Any]], limit: int | None, names: Sequence[str],
                   metrics_of: Callable[[Mapping[str, Any]], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`metrics_of(batch)` (a tensor of the metrics `names`, each a mean over what the batch scores it on) summed
    over up to `limit` batches, each weighed by what it scored each on (`known_coordinates` for a
    `POSITION_METRICS` one, else `valid_steps`), and those weights summed: their ratio is each metric's mean over
    every step (or coordinate), whatever the batches."""
    by_positions = torch.tensor([name in POSITION_METRICS for name in names])
    total, weights = torch.zeros(len(names)), torch.zeros(len(names))
    for count, batch in enumerate(batches, start=1):
        weight = torch.where(by_positions, known_coordinates(batch).cpu(), valid_steps(batch).cpu())
        total = total + metrics_of(batch).detach().float().cpu() * weight
        weights = weights + weight
        if limit is not None and count >= limit:
            break
    return total, weights


@torch.no_grad()
def metric_sums(policy: torch.nn.Module, batches: Iterable[Mapping[str, Any]], limit: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of `SUMMED_METRICS` summed over up to `limit` batches as `_weighted_sums` weighs them, and the weights:
    the ratios are the means over every valid action step (the locate loss: every known coordinate), the same for
    any batch size (a batch's mean weighs as many steps as it has, so a short last batch is not counted like a full
    one); `policy_means` turns them into `VAL_METRICS`."""
    was_training = policy.training
    policy.eval()

    def metrics_of(batch: Mapping[str, Any]) -> torch.Tensor:
        out = policy(batch)
        return torch.stack([out[key].float() for key in SUMMED_METRICS])

    sums = _weighted_sums(batches, limit, SUMMED_METRICS, metrics_of)
    policy.train(was_training)
    return sums


@torch.no_grad()
def baseline_sums(batches: Iterable[Mapping[str, Any]], stats: NormStats, limit: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`BASELINE_METRICS` of always predicting the training mean action with the majority gripper command, summed
    over every valid action step as `metric_sums` sums them, and their weights."""

    def metrics_of(batch: Mapping[str, Any]) -> torch.Tensor:
        actions = batch[ACTIONS].float()
        mean = torch.as_tensor(stats.action.mean, dtype=actions.dtype, device=actions.device).expand_as(actions).clone()
        mean[..., GRIPPER] = binarize_gripper(mean[..., GRIPPER])
        metrics = action_metrics(mean, actions, ~torch.as_tensor(batch[ACTIONS_PAD_MASK], device=actions.device))
        return torch.stack([metrics[key].float() for key in BASELINE_METRICS])

    return _weighted_sums(batches, limit, BASELINE_METRICS, metrics_of)


def evaluate_offline(policy_path: str, data: str | DataConfig, *, split: str = "val", val_fraction: float | None = None,
                     split_seed: int | None = None, batch_size: int = 32, max_batches: int | None = None,
                     num_workers: int = 0) -> dict[str, float]:
    """`val/*`-style metrics (and the mean-action baseline) of a saved policy on a dataset split.

    `data` is a run's `DataConfig` (so the split is exactly the run's) or a source; `val_fraction` and
    `split_seed`, when given, override it. With several sources, each source's metrics follow too
    (`val/source_<i>/...`, `i` its position in the source list): recorded and generated episodes can fit very
    differently, and only the split's mean would hide it.
    """
    from atlas_vla.data.samples import build_samples, collate
    from atlas_vla.data.split import load_train_val
    from atlas_vla.models.policy import AtlasPolicy

    if split not in ("val", "train", "all"):
        raise ValueError(f"split must be val, train or all, got {split!r}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None (the whole split), got {max_batches}")
    config = DataConfig(source=data) if isinstance(data, str) else data
    overrides = {"val_fraction": val_fraction, "split_seed": split_seed}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if split == "all":
        config = replace(config, val_fraction=0.0, val_episodes=None, train_episodes=None)
    policy = AtlasPolicy.from_pretrained(policy_path)
    train, val = load_train_val(config)
    dataset = {"val": val, "train": train, "all": train}[split]
    samples = scored_samples(build_samples(dataset, policy.config.sample_spec, config),
                             None if max_batches is None else max_batches * batch_size)
    sources = _sample_sources(samples)
    # a stream has no sources to split by and is cut at `max_batches` as it comes
    parts = {None: samples} if sources is None else {
        int(source): torch.utils.data.Subset(samples, np.flatnonzero(sources == source).tolist())
        for source in np.unique(sources)}
    limit = max_batches if sources is None else None
    sums = {}
    for source, part in parts.items():
        loader = torch.utils.data.DataLoader(part, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
        sums[source] = (*metric_sums(policy, loader, limit), *baseline_sums(loader, policy.norm_stats, limit))
    if not any(values[1].any() for values in sums.values()):  # no source has a scored step or position
        raise ValueError(f"the {split} split of {config.source} is empty")
    totals, steps, baseline, baseline_steps = (sum(values) for values in zip(*sums.values()))
    metrics = _means(f"{split}/", policy, totals, steps, baseline, baseline_steps)
    if len(sums) > 1:
        for source, values in sums.items():
            metrics.update(_means(f"{split}/source_{source}/", policy, *values))
    return metrics


def _sample_sources(samples: Any) -> np.ndarray | None:
    """Which source each sample came from (a `LiberoSamples` of several sources, or a part of one); else None."""
    if isinstance(samples, torch.utils.data.Subset):
        inner = _sample_sources(samples.dataset)
        return None if inner is None else inner[np.asarray(samples.indices, dtype=np.int64)]
    return getattr(samples, "sample_sources", None)


def named_means(prefix: str, names: Sequence[str], totals: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
    """Weighted sums (`metric_sums`, `baseline_sums`) as means over their weights, each named `<prefix><name>`; a
    metric nothing scored (no action step, or no known position) is left out."""
    return {f"{prefix}{name}": float(value / weight) for name, value, weight in zip(names, totals, weights) if weight}


def policy_means(prefix: str, policy: Any, totals: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
    """`metric_sums`' sums as `VAL_METRICS` named under `prefix`: each summed metric's mean (`named_means`) and the
    loss made of its parts' means by `policy.combined_loss`, the loss of the whole split taken as one batch (no loss
    where no part was scored)."""
    means = named_means(prefix, SUMMED_METRICS, totals, weights)
    if not any(f"{prefix}{name}" in means for name in LOSS_PARTS):
        return means
    return {f"{prefix}loss": float(policy.combined_loss(*(means.get(f"{prefix}{name}", 0.0) for name in LOSS_PARTS))),
            **means}


def _means(prefix: str, policy: Any, totals: torch.Tensor, steps: torch.Tensor, baseline: torch.Tensor,
           baseline_steps: torch.Tensor) -> dict[str, float]:
    """`VAL_METRICS` and the baseline's `BASELINE_METRICS` as means over their steps, named under `prefix`."""
    return {**policy_means(prefix, policy, totals, steps),
            **named_means(f"{prefix}baseline_", BASELINE_METRICS, baseline, baseline_steps)}


def save_metrics(path: str | os.PathLike, metrics: Mapping[str, float], settings: Mapping[str, Any]) -> Path:
    """Write metrics and the settings that produced them as JSON, atomically."""
    return write_json_atomic(path, {"settings": dict(settings), "metrics": dict(metrics)})
