"""Several LIBERO sources trained as one: a check that they are alike, then one table.

LeRobot's `MultiLeRobotDataset` and OpenVLA's dataset mixtures train on several datasets at once;
here `data.source` may list several (local folders or Hub ids, any layout). Each is loaded and split
by episode on its own (so its split does not depend on the others), then the parts are joined:
episode indices are offset so that they stay unique, `SOURCE_INDEX` records where each row came
from, and tasks are keyed by their instruction text (the same instruction in two sources is one
task). Sources that disagree on what a frame holds fail before anything is trained or written.
`SourceWeightedSampler` gives each source a chosen share of the training samples (`data.source_weights`).
"""

from __future__ import annotations

from typing import Any, Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch

from atlas_vla.constants import (
    ACTION,
    AGENT_IMAGE,
    EPISODE_INDEX,
    OBJECT_POSITIONS,
    SOURCE_INDEX,
    STATE,
    TASK_INDEX,
    WRIST_IMAGE,
)
from atlas_vla.data.lerobot_writer import POSITIONS_FEATURE
from atlas_vla.data.sources import describe, map_stream_batches, numpy_column

Table = datasets.Dataset | datasets.IterableDataset


def source_profile(source: str, table: Table, *, columns: dict[str, str] | None = None, split: str = "train",
                   cache_dir: str | None = None) -> dict[str, Any]:
    """What a frame of `source` holds: state and action dimensions, fps (None if the source does not
    say) and the camera image shapes (read from its first frame)."""
    info = describe(source, columns=columns, split=split, cache_dir=cache_dir)
    cameras = table.select_columns([AGENT_IMAGE, WRIST_IMAGE])
    if isinstance(cameras, datasets.IterableDataset):
        first = next(iter(cameras.take(1)), None)
    else:
        first = cameras[0] if len(cameras) else None
    shapes = {camera: tuple(np.asarray(first[camera]).shape) if first else None for camera in (AGENT_IMAGE, WRIST_IMAGE)}
    return {"state_dim": info["state_dim"], "action_dim": info["action_dim"], "fps": info["fps"],
            f"{AGENT_IMAGE} shape": shapes[AGENT_IMAGE], f"{WRIST_IMAGE} shape": shapes[WRIST_IMAGE]}


def check_compatible(sources: Sequence[str], profiles: Sequence[dict[str, Any]]) -> None:
    """`ValueError` naming both sources and the field when two sources' frames differ (an unknown fps
    is not compared)."""
    first, reference = sources[0], profiles[0]
    for source, profile in zip(sources[1:], profiles[1:]):
        for field, value in profile.items():
            expected = reference[field]
            if value != expected and not (field == "fps" and None in (value, expected)):
                raise ValueError(f"data.source: {first} and {source} disagree on {field}: {expected} vs {value}; "
                                 f"sources trained together must record the same kind of frame")


def _unknown_positions(table: Table) -> Table:
    """`table` with an `OBJECT_POSITIONS` column of NaN (nothing known about where its objects are)."""
    if isinstance(table, datasets.IterableDataset):  # in Arrow batches: the images are never decoded here
        features = table.features
        if features is not None:
            features = datasets.Features({**features, OBJECT_POSITIONS: POSITIONS_FEATURE})

        def add(batch: pa.Table) -> pa.Table:
            values = pa.array(np.full(len(batch) * 6, np.nan, np.float32))
            return batch.append_column(OBJECT_POSITIONS, pa.FixedSizeListArray.from_arrays(values, 6))

        return map_stream_batches(table, add, features)
    return table.add_column(OBJECT_POSITIONS, np.full((len(table), 6), np.nan, np.float32).tolist(),
                            feature=POSITIONS_FEATURE)


def tag_source(table: Table, index: int, episode_offset: int, *, with_positions: bool = False) -> Table:
    """Source `index`'s canonical table with its episode indices shifted by `episode_offset` (so they stay
    unique among all sources) and a `SOURCE_INDEX` column. Task indices are dropped: across sources
    only the instruction text names a task. `with_positions` (another source says where its objects are): a
    table without `OBJECT_POSITIONS` gets them as NaN, unknown. Call it before selecting episodes: on a table
    without a row selection the new columns are added without rewriting the others."""
    if TASK_INDEX in (table.column_names or []):
        table = table.remove_columns([TASK_INDEX])
    if with_positions and OBJECT_POSITIONS not in (table.column_names or []):
        table = _unknown_positions(table)
    if isinstance(table, datasets.IterableDataset):  # in Arrow batches: the images are never decoded here
        features = table.features
        if features is not None:
            features = datasets.Features({**features, EPISODE_INDEX: datasets.Value("int64"),
                                          SOURCE_INDEX: datasets.Value("int64")})

        def tag(batch: pa.Table) -> pa.Table:
            episodes = pa.array(batch.column(EPISODE_INDEX).to_numpy().astype(np.int64) + episode_offset)
            batch = batch.set_column(batch.column_names.index(EPISODE_INDEX), EPISODE_INDEX, episodes)
            return batch.append_column(SOURCE_INDEX, pa.array(np.full(len(batch), index, np.int64)))

        return map_stream_batches(table, tag, features)
    episodes = numpy_column(table, EPISODE_INDEX).astype(np.int64) + episode_offset
    table = table.remove_columns([EPISODE_INDEX]).add_column(EPISODE_INDEX, episodes.tolist(),
                                                              feature=datasets.Value("int64"))
    return table.add_column(SOURCE_INDEX, [index] * len(table), feature=datasets.Value("int64"))


def join_sources(tables: Sequence[Table]) -> Table:
    """One table from the `tag_source`d tables of several sources. When their layouts stored the state
    and action differently (fixed- or variable-length lists, float64), both become float32 lists first.
    (Sources that say where their objects are and sources that do not: `tag_source`'s `with_positions`.)"""
    features = [table.features for table in tables]
    if any(f is not None and f != features[0] for f in features):
        target = datasets.Sequence(datasets.Value("float32"))
        lists = [STATE, ACTION, *([OBJECT_POSITIONS] if OBJECT_POSITIONS in (tables[0].column_names or []) else [])]
        for column in lists:
            tables = [table.cast_column(column, target) for table in tables]
    return datasets.concatenate_datasets(list(tables))


class SourceWeightedSampler(torch.utils.data.Sampler[int]):
    """Training sample indices drawn so that source s makes up `weights[s] / sum(weights)` of them.

    Each epoch draws as many indices as there are samples, with replacement, every sample of a source
    equally likely. The draw depends only on (`seed`, epoch), so a resumed run (`set_epoch`, then
    skipping the batches already seen) continues exactly where it stopped.
    """

    def __init__(self, sample_sources: np.ndarray, weights: Sequence[float], seed: int) -> None:
        counts = np.bincount(sample_sources, minlength=len(weights))
        empty = [index for index, count in enumerate(counts) if count == 0]
        if empty:
            raise ValueError(f"data.source_weights: source {empty[0]} has no training samples")
        share = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.probabilities = torch.as_tensor(share[sample_sources] / counts[sample_sources])
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.probabilities)

    def __iter__(self):
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        yield from torch.multinomial(self.probabilities, len(self), replacement=True, generator=generator).tolist()
