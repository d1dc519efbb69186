"""DataConfig: where the LIBERO data of a run comes from and how it is split, and whether it is there (a light
module: no datasets import)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from atlas_vla.constants import CAMERAS, CANONICAL_COLUMNS, TASK_INDEX
from atlas_vla.hub import absolute_path, local_path_or_hub_id


@dataclass
class DataConfig:
    """Where the LIBERO data comes from and how it is split; the sample shape is `SampleSpec`."""

    # Hub dataset id, LeRobot v2/v3 folder or save_to_disk folder; a list trains on several at once: one table
    # whose tasks are keyed by instruction text, each source split by episode on its own
    source: str | list[str] = "physical-intelligence/libero"
    revision: str | None = None  # Hub branch, tag or commit (Hub ids only); None = the default branch
    # several sources: each one's expected share of the training samples (e.g. [1, 3]: a quarter, three
    # quarters), drawn with replacement, the same in every run with the same seed; null = by their sizes
    source_weights: list[float] | None = None
    split: str = "train"  # source split: a LeRobot `info.json` split (episode range) or a DatasetDict key
    streaming: bool = False  # stream parquet shards instead of downloading and caching the whole dataset
    columns: dict[str, str] = field(default_factory=dict)  # canonical column -> source column, overrides detection
    cache_dir: str | None = None  # Hub download and `datasets` cache; None = the Hugging Face defaults
    max_episodes: int | None = None  # keep only the first N episodes (by index) of each source: smoke tests, quick runs
    val_fraction: float = 0.05  # share of episodes held out for validation when no explicit lists are given
    val_episodes: list[int] | None = None  # explicit validation episode indices (overrides val_fraction)
    train_episodes: list[int] | None = None  # explicit training episode indices; None = all non-validation ones
    split_seed: int = 0  # seed of the random episode split (same seed, same split)
    shuffle_buffer_size: int = 1000  # streaming only: samples mixed in a buffer, as rows cannot be indexed
    norm_stats: str | None = None  # statistics JSON (atlas-vla compute-stats); null = computed from the train split
    generate_synthetic: bool = False  # offline demo: write the synthetic dataset to `source` if it is not there yet
    # training images only: pad by N pixels and crop back at a random offset (DrQ); 0 = off. Or one N per camera,
    # [agent view, wrist], e.g. [0, 4]: the wrist camera alone (the agent view's camera never moves)
    random_shift: int | list[int] = 0
    # training only: the share of frames whose instruction is replaced by a paraphrase (`data/paraphrases.py`),
    # drawn from (split_seed, episode, frame), so a frame gets the same words in every run; 0 = off
    paraphrase_prob: float = 0.0

    @property
    def sources(self) -> list[str]:
        """`source` as a list (one entry for a single source)."""
        return [self.source] if isinstance(self.source, str) else list(self.source)

    def __post_init__(self) -> None:
        if isinstance(self.source, list) and len(self.source) == 1:
            self.source = self.source[0]  # one source is one source, however it was written
        if not self.sources:
            raise ValueError("DataConfig.source is an empty list; expected a source or a list of sources")
        several = {"revision": self.revision, "val_episodes": self.val_episodes,
                   "train_episodes": self.train_episodes, "generate_synthetic": self.generate_synthetic or None}
        set_keys = [key for key, value in several.items() if value is not None]
        if len(self.sources) > 1 and set_keys:
            raise ValueError(f"DataConfig.{set_keys[0]} applies to a single source, but source lists "
                             f"{len(self.sources)}: {self.sources}; split several sources with val_fraction")
        if self.source_weights is not None:
            if len(self.source_weights) != len(self.sources) or len(self.sources) < 2:
                raise ValueError(f"DataConfig.source_weights {self.source_weights} needs one weight per source of "
                                 f"several; source lists {len(self.sources)}: {self.sources}")
            if any(not weight > 0 for weight in self.source_weights):
                raise ValueError(f"DataConfig.source_weights must all be > 0, got {self.source_weights}")
            if self.streaming:
                raise ValueError("DataConfig.source_weights draws samples by index: it needs streaming: false")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"DataConfig.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.max_episodes is not None and (not isinstance(self.max_episodes, int) or self.max_episodes < 1):
            raise ValueError(f"DataConfig.max_episodes must be a positive integer or None, got {self.max_episodes!r}")
        if self.shuffle_buffer_size < 0:
            raise ValueError(f"DataConfig.shuffle_buffer_size must be >= 0, got {self.shuffle_buffer_size!r}")
        if not 0.0 <= self.paraphrase_prob <= 1.0:
            raise ValueError(f"DataConfig.paraphrase_prob must be in [0, 1], got {self.paraphrase_prob!r}")
        shifts = self.random_shift if isinstance(self.random_shift, list) else [self.random_shift]
        if (isinstance(self.random_shift, list) and len(shifts) != len(CAMERAS)) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shifts):
            raise ValueError(f"DataConfig.random_shift must be a non-negative integer (pixels) or one per camera "
                             f"[agent view, wrist], e.g. [0, 4]; got {self.random_shift!r}")
        check_column_overrides(self.columns)


def shifts_anything(shift: int | Sequence[int]) -> bool:
    """Whether a `data.random_shift` value (pixels, or one per camera) shifts any image."""
    return any(shift) if isinstance(shift, (list, tuple)) else shift > 0


def check_column_overrides(columns: Mapping[str, str]) -> None:
    """`ValueError` when a column override names a canonical column that does not exist."""
    allowed = set(CANONICAL_COLUMNS) | {TASK_INDEX}
    unknown = sorted(set(columns) - allowed)
    if unknown:
        raise ValueError(f"columns override has unknown canonical name(s) {unknown}; expected some of {sorted(allowed)}")


# the LIBERO datasets on the Hub whose layouts `sources.KNOWN_SCHEMAS` reads: the ids a mistyped one is compared with
KNOWN_HUB_IDS = ("physical-intelligence/libero", "HuggingFaceVLA/libero", "lerobot/libero_spatial_image",
                 "lerobot/libero_object_image", "lerobot/libero_goal_image", "lerobot/libero_10_image")


def check_sources_exist(data_cfg: DataConfig) -> None:
    """`FileNotFoundError` now, before a run writes anything, for a source that is neither on disk nor a Hub id
    (the synthetic demo's folder, which the run writes itself, excepted); a Hub id is checked when it is read."""
    if data_cfg.generate_synthetic:
        return
    for source in data_cfg.sources:
        local_path_or_hub_id(source, missing_source_message(source))


def missing_source_message(source: str) -> str:
    """What a missing source is called: its absolute path, and the nearest existing path or known Hub id."""
    nearest = nearest_source(source)
    return (f"data source {absolute_path(source)} does not exist: no such file or folder, and not a Hub dataset id "
            f"of the form 'org/name'" + (f" (did you mean {nearest}?)" if nearest else ""))


def nearest_source(source: str) -> str | None:
    """What `source` was probably meant to be: the closest existing path beside its missing part, else the
    closest known Hub id ('the Hub dataset ...'); None when nothing is close."""
    path = Path(absolute_path(source))
    base = next(parent for parent in path.parents if parent.is_dir())
    missing = path.relative_to(base).parts[0]
    try:
        names = [child.name for child in base.iterdir()]
    except OSError:  # a folder we may not list
        names = []
    close = difflib.get_close_matches(missing, names, n=1, cutoff=0.6)
    if close:
        return str(base / close[0])
    close = difflib.get_close_matches(source, KNOWN_HUB_IDS, n=1, cutoff=0.6)
    return f"the Hub dataset {close[0]}" if close else None
