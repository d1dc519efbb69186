"""Stage 2 of a run: the training and validation samples, their normalisation statistics and the loaders.

`load_data` reads the sources (the main process first, so that it alone writes synthetic data and the
`datasets` cache); `build_loader` is the one place where a `DataLoader` of a run is configured.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from atlas_vla.config import TrainingConfig
from atlas_vla.data.config import DataConfig
from atlas_vla.data.feature_store import StoredFeatureSamples
from atlas_vla.data.mixture import SourceWeightedSampler
from atlas_vla.data.normalization import NormStats, compute_norm_stats
from atlas_vla.data.samples import build_samples, collate
from atlas_vla.data.spec import SampleSpec
from atlas_vla.data.split import load_train_val
from atlas_vla.data.synthetic import make_synthetic_libero
from atlas_vla.eval.offline import scored_samples
from atlas_vla.training.preemption import ignore_stop_signals

logger = logging.getLogger("atlas_vla.train")


def load_data(accelerator: Accelerator, data_cfg: DataConfig, spec: SampleSpec) -> tuple[Any, Any | None, NormStats]:
    """Stage 2: (training samples, validation samples or None for an empty split, normalisation statistics).

    The main process goes first, so that it alone writes the synthetic data and the `datasets` cache.
    """
    with accelerator.main_process_first():
        if data_cfg.generate_synthetic and not Path(data_cfg.source).exists():
            logger.info("data.source %s does not exist: writing the synthetic demo dataset there "
                        "(data.generate_synthetic)", data_cfg.source)
            make_synthetic_libero(data_cfg.source)
        train_set, val_set = load_train_val(data_cfg)
        stats = _norm_stats(data_cfg, train_set)
    train_samples = build_samples(train_set, spec, data_cfg, train=True)
    val_samples = build_samples(val_set, spec, data_cfg) if _has_rows(val_set) else None
    return train_samples, val_samples, stats


def _norm_stats(data_cfg: DataConfig, train_set: Any) -> NormStats:
    if data_cfg.norm_stats:
        return NormStats.load(data_cfg.norm_stats)
    if not hasattr(train_set, "select_columns") or not hasattr(train_set, "__len__"):
        raise ValueError("data.streaming is on: compute statistics once with `atlas-vla compute-stats SOURCE "
                         "--output stats.json` and set data.norm_stats to that file")
    return compute_norm_stats(train_set, data_cfg.sources)


def _has_rows(dataset: Any) -> bool:
    """False for an empty split (e.g. val_fraction 0); a stream always counts as having rows."""
    try:
        return len(dataset) > 0
    except TypeError:
        return True


def check_one_batch(train_samples: Any, batch_size: int, num_processes: int) -> None:
    """The training loader drops an epoch's last partial batch: fewer samples than one global batch would
    leave no update to run."""
    if hasattr(train_samples, "__len__") and len(train_samples) < batch_size * num_processes:
        raise ValueError(f"the training split has {len(train_samples)} samples, fewer than one batch of "
                         f"training.train_batch_size={batch_size} on each of {num_processes} process(es): "
                         f"lower the batch size or add data")


def source_sampler(samples: Any, data_cfg: DataConfig, seed: int) -> SourceWeightedSampler | None:
    """The source-weighted sampler `data.source_weights` asks for (None: the usual shuffled order)."""
    if data_cfg.source_weights is None:
        return None
    return SourceWeightedSampler(samples.sample_sources, data_cfg.source_weights, seed)


def build_loader(samples: Any, training_cfg: TrainingConfig, shuffle: bool,
                 sampler: torch.utils.data.Sampler | None = None) -> torch.utils.data.DataLoader:
    """A loader of the run: shuffled (or drawn by `sampler`) with the last partial batch dropped for training,
    in order and complete for validation; its own seeded generator, and workers that ignore stop signals."""
    workers = training_cfg.dataloader_num_workers
    iterable = isinstance(samples, torch.utils.data.IterableDataset)
    return torch.utils.data.DataLoader(
        samples, batch_size=training_cfg.train_batch_size, shuffle=shuffle and not iterable and sampler is None,
        sampler=sampler,
        drop_last=shuffle, num_workers=workers, collate_fn=collate,
        # stored features are drawn per epoch (`StoredFeatureSamples.set_epoch`): workers must see each new epoch
        persistent_workers=workers > 0 and not isinstance(samples, StoredFeatureSamples),
        worker_init_fn=ignore_stop_signals,  # a preempted job's process group signal is the trainer's to handle
        # its own generator: creating an epoch's iterator must not consume the global RNG,
        # or a resumed run would draw different random numbers than an uninterrupted one
        generator=torch.Generator().manual_seed(training_cfg.seed),
    )


def build_val_loader(val_samples: Any, training_cfg: TrainingConfig, num_processes: int) -> torch.utils.data.DataLoader:
    """The validation loader of a run of `num_processes`: with `training.num_validation_batches` N, the N x batch x
    processes samples spread over the whole split (`scored_samples`), so that each process scores N batches of them
    once `accelerator.prepare` has shared them out."""
    limit = training_cfg.num_validation_batches
    count = None if limit is None else limit * training_cfg.train_batch_size * num_processes
    return build_loader(scored_samples(val_samples, count), training_cfg, shuffle=False)
