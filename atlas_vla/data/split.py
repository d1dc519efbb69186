"""The episode split: which whole episodes train and which validate, deterministically from the config."""

from __future__ import annotations

from typing import Sequence

import datasets
import numpy as np

from atlas_vla.constants import EPISODE_INDEX, OBJECT_POSITIONS
from atlas_vla.data.config import DataConfig
from atlas_vla.data.mixture import check_compatible, join_sources, source_profile, tag_source
from atlas_vla.data.sources import (
    load_libero_with_episodes,
    numpy_column,
    select_episodes,
)


def split_episodes(
    dataset: datasets.Dataset | datasets.IterableDataset, config: DataConfig, *, episode_ids: Sequence[int] | None = None
) -> tuple[datasets.Dataset | datasets.IterableDataset, datasets.Dataset | datasets.IterableDataset]:
    """Split into (train, validation) by whole episodes, so no validation frame is ever trained on.

    Explicit `config.val_episodes` / `config.train_episodes` are honoured; otherwise a
    `config.val_fraction` share of the episodes (at least one when the fraction is > 0) is drawn
    with `config.split_seed`. A streaming dataset cannot be scanned for its episodes: pass
    `episode_ids` (or use `load_train_val`, which reads them from the metadata).
    """
    if episode_ids is None:
        if isinstance(dataset, datasets.IterableDataset):
            raise ValueError("split_episodes on a streaming dataset needs episode_ids= (see load_train_val)")
        episode_ids = np.unique(numpy_column(dataset, EPISODE_INDEX)).tolist()
    train, val = _choose_episodes(sorted(int(i) for i in episode_ids), config)
    return select_episodes(dataset, EPISODE_INDEX, train), select_episodes(dataset, EPISODE_INDEX, val)


def _choose_episodes(available: list[int], config: DataConfig) -> tuple[list[int], list[int]]:
    """(train, val) episode indices; deterministic from `config.split_seed`."""
    if not available:
        raise ValueError("cannot split an empty dataset: it has no episodes")
    known = set(available)
    for name in ("val_episodes", "train_episodes"):
        unknown = sorted(set(getattr(config, name) or []) - known)
        if unknown:
            raise ValueError(
                f"DataConfig.{name} has episode(s) {unknown} that are not in the dataset "
                f"({len(available)} episodes, indices {available[0]}..{available[-1]})"
            )
    if config.val_episodes is not None:
        val = sorted(set(config.val_episodes))
    elif config.train_episodes is not None:
        val = sorted(known - set(config.train_episodes))
    else:
        count = int(round(config.val_fraction * len(available)))
        count = max(count, 1) if config.val_fraction > 0 else 0
        permuted = np.random.default_rng(config.split_seed).permutation(np.asarray(available))
        val = sorted(int(i) for i in permuted[:count])
    train = sorted(set(config.train_episodes) if config.train_episodes is not None else known - set(val))
    overlap = sorted(set(train) & set(val))
    if overlap:
        raise ValueError(f"episode(s) {overlap} are in both DataConfig.train_episodes and DataConfig.val_episodes")
    if not train:
        raise ValueError(f"the training split is empty ({len(available)} episodes, {len(val)} held out for validation)")
    if not val and config.val_fraction > 0 and config.val_episodes is None:
        raise ValueError(
            f"the validation split is empty: train_episodes covers all {len(available)} episodes; "
            "set val_fraction=0 to train without validation"
        )
    return train, val


def load_train_val(
    config: DataConfig,
) -> tuple[datasets.Dataset | datasets.IterableDataset, datasets.Dataset | datasets.IterableDataset]:
    """Load `config.source` and split it by episode: the one call the training script makes.

    Several sources (`source` a list) are each loaded and split on their own, checked to record the
    same kind of frame, and joined into one train and one validation table (`data.mixture`).
    """
    if isinstance(config.source, str):
        dataset, episode_ids = _load(config.source, config)
        return split_episodes(dataset, config, episode_ids=episode_ids)
    loaded = [_load(source, config) for source in config.sources]
    profiles = [source_profile(source, dataset, columns=config.columns, split=config.split, cache_dir=config.cache_dir)
                for source, (dataset, _) in zip(config.sources, loaded)]
    check_compatible(config.sources, profiles)
    trains, vals = [], []
    episode_offset = 0
    with_positions = any(OBJECT_POSITIONS in (dataset.column_names or []) for dataset, _ in loaded)
    for index, (dataset, episode_ids) in enumerate(loaded):
        dataset = tag_source(dataset, index, episode_offset, with_positions=with_positions)
        train, val = split_episodes(dataset, config, episode_ids=[e + episode_offset for e in episode_ids])
        trains.append(train)
        vals.append(val)
        episode_offset += max(episode_ids) + 1
    return join_sources(trains), join_sources(vals)


def _load(source: str, config: DataConfig) -> tuple[datasets.Dataset | datasets.IterableDataset, list[int]]:
    return load_libero_with_episodes(source, revision=config.revision, streaming=config.streaming,
                                     columns=config.columns, split=config.split, max_episodes=config.max_episodes,
                                     cache_dir=config.cache_dir)
