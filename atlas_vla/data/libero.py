"""LIBERO through `datasets`: sources, episode split and training samples.

Three steps, each usable on its own:

1. `load_libero(source)` turns any LIBERO source (a Hub dataset id, a local LeRobot v2.x or v3.0
   folder, a `Dataset.save_to_disk` folder) into one `datasets` table, one row per frame, with the
   canonical columns of `atlas_vla.constants`. The layout and the column schema are detected from
   what is on disk, never guessed: anything unexpected is one `ValueError` saying what was found.
2. `split_episodes(dataset, config)` holds out whole episodes for validation.
3. `LiberoSamples(dataset, spec)` (or `LiberoSampleStream` for a streaming dataset) builds training
   samples with the batch keys of `atlas_vla.constants`: camera views decoded straight from the
   Arrow image bytes, an action chunk with its padding mask, temporal context; `collate` batches them.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from atlas_vla.constants import (
    ACTION,
    ACTIONS,
    ACTIONS_PAD_MASK,
    AGENT_IMAGE,
    CANONICAL_COLUMNS,
    EPISODE_INDEX,
    FRAME_INDEX,
    INSTRUCTION,
    OBS_IMAGES,
    OBS_STATE,
    STATE,
    TASK_INDEX,
    WRIST_IMAGE,
)
from atlas_vla.data.spec import SampleSpec
from atlas_vla.data.transforms import image_to_chw, random_shift as random_shift_images

LAYOUT_LEROBOT_V2 = "lerobot-v2"  # meta/info.json (v2.x), meta/tasks.jsonl, data/chunk-*/episode_*.parquet
LAYOUT_LEROBOT_V3 = "lerobot-v3"  # meta/info.json (v3.x), meta/tasks.parquet, data/chunk-*/file-*.parquet
LAYOUT_SAVED = "saved-dataset"  # a folder written by Dataset.save_to_disk / DatasetDict.save_to_disk
LAYOUTS = (LAYOUT_LEROBOT_V2, LAYOUT_LEROBOT_V3, LAYOUT_SAVED)

# Source column names of every known LIBERO schema (canonical column -> source column). Episode and
# frame indices are called the same everywhere. The first schema whose columns all exist wins.
KNOWN_SCHEMAS: dict[str, dict[str, str]] = {
    "atlas-vla": {AGENT_IMAGE: AGENT_IMAGE, WRIST_IMAGE: WRIST_IMAGE, STATE: STATE, ACTION: ACTION},
    "physical-intelligence/libero": {AGENT_IMAGE: "image", WRIST_IMAGE: "wrist_image", STATE: "state", ACTION: "actions"},
    "HuggingFaceVLA/libero": {
        AGENT_IMAGE: "observation.images.image",
        WRIST_IMAGE: "observation.images.image2",
        STATE: "observation.state",
        ACTION: "action",
    },
    "lerobot/libero_*_image": {
        AGENT_IMAGE: "observation.images.image",
        WRIST_IMAGE: "observation.images.wrist_image",
        STATE: "observation.state",
        ACTION: "action",
    },
}
_INDEX_COLUMNS = {EPISODE_INDEX: EPISODE_INDEX, FRAME_INDEX: FRAME_INDEX}
_CAMERAS = (AGENT_IMAGE, WRIST_IMAGE)
_REPO_ID = re.compile(r"[\w.\-]+/[\w.\-]+")


@dataclass
class DataConfig:
    """Where the LIBERO data comes from and how it is split; the sample shape is `SampleSpec`."""

    source: str = "physical-intelligence/libero"  # Hub dataset id, LeRobot v2/v3 folder, or save_to_disk folder
    revision: str | None = None  # Hub branch, tag or commit (Hub ids only); None = the default branch
    split: str = "train"  # source split: a LeRobot `info.json` split (episode range) or a DatasetDict key
    streaming: bool = False  # stream parquet shards instead of downloading and caching the whole dataset
    columns: dict[str, str] = field(default_factory=dict)  # canonical column -> source column, overrides detection
    cache_dir: str | None = None  # Hub download and `datasets` cache; None = the Hugging Face defaults
    max_episodes: int | None = None  # keep only the first N episodes (by index): smoke tests, quick runs
    val_fraction: float = 0.05  # share of episodes held out for validation when no explicit lists are given
    val_episodes: list[int] | None = None  # explicit validation episode indices (overrides val_fraction)
    train_episodes: list[int] | None = None  # explicit training episode indices; None = all non-validation ones
    split_seed: int = 0  # seed of the random episode split (same seed, same split)
    shuffle_buffer_size: int = 1000  # streaming only: samples mixed in a buffer, as rows cannot be indexed
    norm_stats: str | None = None  # statistics JSON (atlas-vla compute-stats); null = computed from the train split
    generate_synthetic: bool = False  # offline demo: write the synthetic dataset to `source` if it is not there yet
    random_shift: int = 0  # training images only: pad by N pixels and crop back at a random offset (DrQ); 0 = off

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"DataConfig.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.max_episodes is not None and (not isinstance(self.max_episodes, int) or self.max_episodes < 1):
            raise ValueError(f"DataConfig.max_episodes must be a positive integer or None, got {self.max_episodes!r}")
        if self.shuffle_buffer_size < 0:
            raise ValueError(f"DataConfig.shuffle_buffer_size must be >= 0, got {self.shuffle_buffer_size!r}")
        if not isinstance(self.random_shift, int) or self.random_shift < 0:
            raise ValueError(f"DataConfig.random_shift must be a non-negative integer (pixels), got {self.random_shift!r}")
        _check_overrides(self.columns)


# ----------------------------------------------------------------------------------------------
# 1. sources -> one canonical table
# ----------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """A located source: its local folder (a Hub snapshot for Hub ids) and its metadata."""

    root: Path
    layout: str
    repo_id: str | None = None  # set for Hub sources
    commit: str | None = None  # the Hub commit the snapshot belongs to
    info: dict = field(default_factory=dict)  # LeRobot meta/info.json
    tasks: dict[int, str] = field(default_factory=dict)  # task_index -> instruction

    def describe_name(self) -> str:
        return self.repo_id or str(self.root)


def detect_layout(path: str | Path) -> str:
    """Name the layout of a local dataset folder: one of `LAYOUTS`.

    LeRobot folders are recognised by `meta/info.json` and its `codebase_version`; `save_to_disk`
    folders by `dataset_info.json` + `state.json` (or `dataset_dict.json`). Anything else raises a
    `ValueError` that lists what the folder holds.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise ValueError(f"expected a dataset folder, got a file: {root}")
    info_path = root / "meta" / "info.json"
    if info_path.is_file():
        version = str(_read_json(info_path).get("codebase_version", ""))
        if version.startswith("v2"):
            return LAYOUT_LEROBOT_V2
        if version.startswith("v3"):
            return LAYOUT_LEROBOT_V3
        raise ValueError(f"{info_path}: codebase_version {version!r} is not supported; expected v2.x or v3.x (LeRobot)")
    if (root / "dataset_dict.json").is_file() or ((root / "dataset_info.json").is_file() and (root / "state.json").is_file()):
        return LAYOUT_SAVED
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    raise ValueError(
        f"unknown dataset layout in {root}: found {found}; expected a LeRobot v2/v3 folder (meta/info.json + data/) "
        "or a Dataset.save_to_disk folder (dataset_info.json + state.json)"
    )


def load_libero(
    source: str,
    *,
    revision: str | None = None,
    streaming: bool = False,
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    max_episodes: int | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a LIBERO source as one `datasets` table with the canonical columns.

    `source` is a Hub dataset id (e.g. `physical-intelligence/libero`, `HuggingFaceVLA/libero`,
    `lerobot/libero_spatial_image`), a local LeRobot v2.x/v3.0 folder or a `save_to_disk` folder.
    Hub ids are fetched with `huggingface_hub.snapshot_download` (metadata only when streaming; the
    parquet shards are then streamed from `hf://` at the same commit). Columns are mapped from the
    detected schema (`KNOWN_SCHEMAS`), with `columns={canonical: source_column}` taking precedence,
    and instructions are joined from the task table. `max_episodes` keeps the first N episodes.
    The result has `CANONICAL_COLUMNS` (plus `TASK_INDEX` when the source has it); images stay
    encoded in the table (decoded to PIL on access).
    """
    dataset, _ = _load(
        source,
        revision=revision,
        streaming=streaming,
        columns=columns,
        split=split,
        max_episodes=max_episodes,
        cache_dir=cache_dir,
    )
    return dataset


def _load(
    source: str,
    *,
    revision: str | None,
    streaming: bool,
    columns: Mapping[str, str] | None,
    split: str,
    max_episodes: int | None,
    cache_dir: str | None,
) -> tuple[datasets.Dataset | datasets.IterableDataset, list[int]]:
    """`load_libero`, also returning the episode indices the result holds."""
    _check_overrides(columns or {})
    src = _open_source(source, revision=revision, cache_dir=cache_dir)
    if src.layout == LAYOUT_SAVED:
        dataset = _load_saved(src.root, split)
        mapping, _ = resolve_columns(dataset.column_names, columns, where=str(src.root))
        available = np.unique(_numpy_column(dataset, mapping[EPISODE_INDEX])).tolist()
        keep = available[:max_episodes]
        dataset = _select_episodes(dataset, mapping[EPISODE_INDEX], keep if keep != available else None)
        if streaming:
            dataset = dataset.to_iterable_dataset()
    else:
        dataset, mapping, keep = _load_lerobot(
            src, split=split, streaming=streaming, columns=columns, max_episodes=max_episodes, cache_dir=cache_dir
        )
    return _to_canonical(dataset, mapping, src.tasks, where=src.describe_name()), keep


def resolve_columns(
    found: Sequence[str], overrides: Mapping[str, str] | None = None, *, where: str = "dataset"
) -> tuple[dict[str, str], str]:
    """Map canonical columns to the columns `found` in a source; returns (mapping, schema name).

    Tries every schema of `KNOWN_SCHEMAS` with `overrides` applied on top; the first whose columns
    all exist wins (schema name "custom" when the overrides alone cover everything). Otherwise one
    `ValueError` lists the columns found and, per known schema, what is missing.
    """
    overrides = dict(overrides or {})
    found_set = set(found)
    misses = []
    for name, schema in [*KNOWN_SCHEMAS.items(), ("custom", {})]:
        mapping = {**schema, **_INDEX_COLUMNS, **overrides}
        missing = sorted({source for canonical, source in mapping.items() if source not in found_set})
        if not missing and all(key in mapping for key in (AGENT_IMAGE, WRIST_IMAGE, STATE, ACTION)):
            if TASK_INDEX not in mapping and TASK_INDEX in found_set:
                mapping[TASK_INDEX] = TASK_INDEX
            if INSTRUCTION not in mapping and INSTRUCTION in found_set:
                mapping[INSTRUCTION] = INSTRUCTION
            duplicated = sorted({s for s in mapping.values() if list(mapping.values()).count(s) > 1})
            if duplicated:
                raise ValueError(f"{where}: source column(s) {duplicated} mapped to more than one canonical column: {mapping}")
            label = name if not overrides or name == "custom" else f"{name} + overrides"
            return mapping, label
        if schema:
            misses.append(f"{name}: missing {missing}")
    raise ValueError(
        f"{where}: no known LIBERO column schema matches; found columns {sorted(found_set)}. "
        f"Expected one of: {'; '.join(misses)}. Map columns explicitly with columns={{canonical: source_column}} "
        f"(canonical names: {[AGENT_IMAGE, WRIST_IMAGE, STATE, ACTION, EPISODE_INDEX, FRAME_INDEX]})"
    )


def _check_overrides(columns: Mapping[str, str]) -> None:
    allowed = set(CANONICAL_COLUMNS) | {TASK_INDEX}
    unknown = sorted(set(columns) - allowed)
    if unknown:
        raise ValueError(f"columns override has unknown canonical name(s) {unknown}; expected some of {sorted(allowed)}")


def _open_source(source: str, *, revision: str | None, cache_dir: str | None) -> _Source:
    """Locate `source` (local folder, or a Hub id whose metadata is fetched), detect its layout, read its metadata."""
    path = Path(source).expanduser()
    repo_id = commit = None
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub dataset ids only, but {source!r} is a local folder")
        root = path
    elif source.startswith((".", "/", "~")) or not _REPO_ID.fullmatch(source):
        raise FileNotFoundError(
            f"unknown LIBERO source {source!r}: no such local folder, and not a Hub dataset id of the form 'org/name'"
        )
    else:
        root, repo_id = _download(source, revision=revision, cache_dir=cache_dir, patterns=["meta/*"]), source
        commit = root.name  # snapshot folders are named by commit hash
    src = _Source(root=root, layout=detect_layout(root), repo_id=repo_id, commit=commit)
    if src.layout != LAYOUT_SAVED:
        src.info = _read_json(root / "meta" / "info.json")
        src.tasks = _read_tasks(root, src.layout)
    return src


def _download(repo_id: str, *, revision: str | None, cache_dir: str | None, patterns: list[str]) -> Path:
    """Snapshot the files of a Hub dataset repo that match `patterns` into the HF cache; returns the snapshot."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, repo_type="dataset", revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except (OSError, ValueError) as error:  # hub errors: not found, offline and not cached, bad revision
        reason = f"{type(error).__name__}: {error}".replace("\n", " ")
        raise ValueError(f"could not get Hub dataset {repo_id!r} (revision {revision or 'main'}): {reason}") from error
    return Path(folder)


def _read_json(path: Path) -> dict:
    try:
        with open(path) as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def _read_tasks(root: Path, layout: str) -> dict[int, str]:
    """task_index -> instruction from meta/tasks.jsonl (v2) or meta/tasks.parquet (v3)."""
    if layout == LAYOUT_LEROBOT_V2:
        path = root / "meta" / "tasks.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a LeRobot v2 dataset lists its instructions there")
        tasks = {}
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    tasks[int(row["task_index"])] = str(row["task"])
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ValueError(f"{path}:{number}: expected {{\"task_index\": int, \"task\": str}}, got {line!r}") from error
        return tasks
    path = root / "meta" / "tasks.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a LeRobot v3 dataset lists its instructions there")
    table = _read_parquet(path)
    # LeRobot writes a pandas frame indexed by the task string: the strings are the index column.
    text = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
    if TASK_INDEX not in table.column_names or text is None:
        raise ValueError(f"{path}: expected columns 'task_index' and 'task' (or the pandas index), found {table.column_names}")
    return dict(zip(table.column(TASK_INDEX).to_pylist(), map(str, table.column(text).to_pylist())))


def _read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable parquet file ({error})") from error


def _parquet_columns(path: Path) -> list[str]:
    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable parquet file ({error})") from error


def _episode_ids(src: _Source) -> list[int]:
    """Sorted episode indices listed in the LeRobot metadata."""
    if src.layout == LAYOUT_LEROBOT_V2:
        path = src.root / "meta" / "episodes.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a LeRobot v2 dataset lists its episodes there")
        return sorted(int(json.loads(line)["episode_index"]) for line in path.read_text().splitlines() if line.strip())
    files = sorted((src.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"no meta/episodes/chunk-*/file-*.parquet in {src.root}: a LeRobot v3 dataset lists its episodes there"
        )
    return sorted(int(i) for f in files for i in _read_parquet(f, [EPISODE_INDEX]).column(EPISODE_INDEX).to_pylist())


def _split_episodes_in_info(src: _Source, split: str) -> range | None:
    """Episodes of `split` from info.json's `splits` ("start:stop"); None = every episode."""
    splits = src.info.get("splits") or {}
    if split not in splits:
        if split == "train" and not splits:
            return None
        raise ValueError(f"split {split!r} not in {src.describe_name()}; available splits: {sorted(splits) or ['train']}")
    start, stop = (int(x) for x in str(splits[split]).split(":"))
    return range(start, stop)


def _load_lerobot(
    src: _Source,
    *,
    split: str,
    streaming: bool,
    columns: Mapping[str, str] | None,
    max_episodes: int | None,
    cache_dir: str | None,
) -> tuple[datasets.Dataset | datasets.IterableDataset, dict[str, str], list[int]]:
    """Read the parquet shards of a LeRobot v2/v3 folder (or stream them from the Hub).

    Returns the dataset in source columns, the column mapping and the episode indices kept.
    """
    features = src.info.get("features", {})
    videos = sorted(k for k, v in features.items() if isinstance(v, dict) and v.get("dtype") == "video")
    remote = src.repo_id is not None and streaming  # stream from hf:// instead of reading the snapshot
    available = _episode_ids(src)
    in_split = _split_episodes_in_info(src, split)
    keep = [i for i in available if in_split is None or i in in_split][:max_episodes]
    if not keep:
        raise ValueError(f"{src.describe_name()}: split {split!r} holds no episodes")

    if src.layout == LAYOUT_LEROBOT_V2:
        template = src.info.get("data_path", "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet")
        chunk_size = int(src.info.get("chunks_size", 1000))
        relative = [template.format(episode_chunk=i // chunk_size, episode_index=i) for i in keep]
    elif src.repo_id is not None:
        relative = ["data/*/*.parquet"]  # listed by the Hub: the metadata snapshot holds no data yet
    else:
        relative = sorted(str(p.relative_to(src.root)) for p in src.root.glob("data/chunk-*/file-*.parquet"))
    if src.repo_id is not None and not streaming:
        # Into the same snapshot; exact file names only for a subset (each pattern is matched against every file).
        patterns = relative if len(keep) < len(available) else ["data/*"]
        _download(src.repo_id, revision=src.commit, cache_dir=cache_dir, patterns=patterns)
        if src.layout == LAYOUT_LEROBOT_V3:
            relative = sorted(str(p.relative_to(src.root)) for p in src.root.glob("data/chunk-*/file-*.parquet"))
    if not relative:
        raise ValueError(f"{src.describe_name()}: no parquet data files found under data/chunk-*/")

    if remote:
        found = list(features)
        files = [f"hf://datasets/{src.repo_id}@{src.commit}/{r}" for r in relative]
    else:
        files = [str(src.root / r) for r in relative]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} data file(s) listed in the metadata are missing, e.g. {missing[0]}")
        found = _parquet_columns(Path(files[0]))
    mapping, _ = resolve_columns(found, columns, where=src.describe_name())
    bad = [mapping[c] for c in _CAMERAS if mapping[c] in videos]
    if bad:
        raise ValueError(
            f"{src.describe_name()}: camera column(s) {bad} are stored as video; atlas-vla reads image columns "
            "(use an *_image dataset such as lerobot/libero_spatial_image or physical-intelligence/libero)"
        )
    if not remote:
        for file in files[1:]:
            absent = sorted(set(mapping.values()) - set(_parquet_columns(Path(file))))
            if absent:
                raise ValueError(f"{file}: missing column(s) {absent}; expected {sorted(mapping.values())}")

    dataset = datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming, cache_dir=cache_dir)
    if src.layout == LAYOUT_LEROBOT_V3 and keep != available:
        dataset = _select_episodes(dataset, mapping[EPISODE_INDEX], keep)
    return dataset, mapping, keep


def _load_saved(root: Path, split: str) -> datasets.Dataset:
    """A `save_to_disk` folder (a Dataset, or a DatasetDict from which `split` is taken)."""
    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"split {split!r} not in {root}; available splits: {sorted(loaded)}")
        return loaded[split]
    if split != "train":
        raise ValueError(f"{root} holds a single Dataset; split must be 'train', got {split!r}")
    return loaded


def _numpy_column(dataset: datasets.Dataset, column: str) -> np.ndarray:
    """One column as a NumPy array, read from Arrow without touching the other columns."""
    return np.asarray(dataset.select_columns([column]).with_format("numpy")[:][column])


def _select_episodes(
    dataset: datasets.Dataset | datasets.IterableDataset, column: str, episodes: Sequence[int] | None
) -> datasets.Dataset | datasets.IterableDataset:
    """Rows whose `column` is in `episodes` (None = all); vectorised, no data is copied."""
    if episodes is None:
        return dataset
    wanted = np.asarray(sorted(episodes), dtype=np.int64)
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.filter(lambda batch: np.isin(np.asarray(batch[column]), wanted).tolist(), batched=True)
    return dataset.select(np.flatnonzero(np.isin(_numpy_column(dataset, column), wanted)))


def _to_canonical(
    dataset: datasets.Dataset | datasets.IterableDataset, mapping: dict[str, str], tasks: dict[int, str], *, where: str
) -> datasets.Dataset | datasets.IterableDataset:
    """Select + rename the mapped columns, make the cameras `datasets.Image`, join the instructions."""
    dataset = dataset.select_columns(list(mapping.values())).rename_columns(
        {source: canonical for canonical, source in mapping.items() if source != canonical}
    )
    features = dataset.features
    for camera in _CAMERAS:
        feature = features[camera] if features is not None else None
        if feature is not None and not isinstance(feature, datasets.Image):
            if not (isinstance(feature, dict) and set(feature) == {"bytes", "path"}):
                raise ValueError(f"{where}: column {mapping[camera]!r} is {feature}, expected an image ({{bytes, path}} struct)")
            dataset = dataset.cast_column(camera, datasets.Image())
    if INSTRUCTION not in mapping:
        dataset = _join_instructions(dataset, tasks, has_task_index=TASK_INDEX in mapping, where=where)
    return dataset.select_columns([*CANONICAL_COLUMNS, *([TASK_INDEX] if TASK_INDEX in mapping else [])])


def _join_instructions(
    dataset: datasets.Dataset | datasets.IterableDataset, tasks: dict[int, str], *, has_task_index: bool, where: str
) -> datasets.Dataset | datasets.IterableDataset:
    """Add the INSTRUCTION column by looking TASK_INDEX up in the task table."""
    if not has_task_index or not tasks:
        raise ValueError(
            f"{where}: no instructions; expected an {INSTRUCTION!r} column, or a {TASK_INDEX!r} column and a task table "
            f"(meta/tasks.jsonl or meta/tasks.parquet); found columns {dataset.column_names}"
        )

    def lookup(task_indices: Sequence[int]) -> list[str]:
        unknown = sorted(set(task_indices) - set(tasks))
        if unknown:
            raise ValueError(f"{where}: task_index {unknown} not in the task table (known: {sorted(tasks)})")
        return [tasks[i] for i in task_indices]

    if isinstance(dataset, datasets.IterableDataset):
        features = dataset.features
        if features is not None:
            features = datasets.Features({**features, INSTRUCTION: datasets.Value("string")})
        return dataset.map(lambda batch: {INSTRUCTION: lookup(batch[TASK_INDEX])}, batched=True, features=features)
    codes = _numpy_column(dataset, TASK_INDEX)
    table = np.asarray(lookup(np.unique(codes).tolist()), dtype=object)
    instructions = table[np.searchsorted(np.unique(codes), codes)]
    return dataset.add_column(INSTRUCTION, instructions.tolist(), feature=datasets.Value("string"))


def describe(
    source: str,
    *,
    revision: str | None = None,
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Summarise a LIBERO source without reading its frames (metadata only for LeRobot layouts).

    Keys: `source`, `layout`, `schema` (the detected column schema), `columns` (canonical -> source),
    `num_episodes`, `num_frames`, `tasks` (instructions by task index), `state_dim`, `action_dim`,
    `cameras` (source image columns), `fps` (None when the source does not say), `episode_ids`.
    LeRobot layouts are described whole; `split` picks the split of a saved DatasetDict.
    """
    _check_overrides(columns or {})
    src = _open_source(source, revision=revision, cache_dir=cache_dir)
    if src.layout == LAYOUT_SAVED:
        dataset = _load_saved(src.root, split)
        mapping, schema = resolve_columns(dataset.column_names, columns, where=str(src.root))
        if INSTRUCTION not in mapping:
            raise ValueError(f"{src.root}: a saved dataset needs an {INSTRUCTION!r} column; found {dataset.column_names}")
        episode_ids = np.unique(_numpy_column(dataset, mapping[EPISODE_INDEX])).tolist()
        tasks = sorted(dataset.unique(mapping[INSTRUCTION]))
        cameras = [name for name, f in dataset.features.items() if isinstance(f, datasets.Image)]
        first = dataset.select_columns([mapping[STATE], mapping[ACTION]])[0] if len(dataset) else {}
        dims = {key: len(first.get(mapping[key], [])) for key in (STATE, ACTION)}
        num_frames, fps = len(dataset), None
    else:
        features = src.info.get("features", {})
        mapping, schema = resolve_columns(list(features), columns, where=src.describe_name())
        episode_ids = _episode_ids(src)
        tasks = [src.tasks[i] for i in sorted(src.tasks)]
        cameras = [name for name, f in features.items() if isinstance(f, dict) and f.get("dtype") in ("image", "video")]
        dims = {key: int(np.prod(features[mapping[key]].get("shape", [0]))) for key in (STATE, ACTION)}
        num_frames, fps = int(src.info.get("total_frames", 0)), src.info.get("fps")
    return {
        "source": src.describe_name(),
        "layout": src.layout,
        "revision": src.commit,
        "schema": schema,
        "columns": mapping,
        "num_episodes": len(episode_ids),
        "num_frames": num_frames,
        "tasks": tasks,
        "state_dim": dims[STATE],
        "action_dim": dims[ACTION],
        "cameras": cameras,
        "fps": fps,
        "episode_ids": episode_ids,
    }


# ----------------------------------------------------------------------------------------------
# 2. episode split
# ----------------------------------------------------------------------------------------------


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
        episode_ids = np.unique(_numpy_column(dataset, EPISODE_INDEX)).tolist()
    train, val = _choose_episodes(sorted(int(i) for i in episode_ids), config)
    return _select_episodes(dataset, EPISODE_INDEX, train), _select_episodes(dataset, EPISODE_INDEX, val)


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
    """Load `config.source` and split it by episode: the one call the training script makes."""
    dataset, episode_ids = _load(
        config.source,
        revision=config.revision,
        streaming=config.streaming,
        columns=config.columns,
        split=config.split,
        max_episodes=config.max_episodes,
        cache_dir=config.cache_dir,
    )
    return split_episodes(dataset, config, episode_ids=episode_ids)


# ----------------------------------------------------------------------------------------------
# 3. training samples
# ----------------------------------------------------------------------------------------------


@dataclass
class _Frames:
    """Frame-level arrays in (episode, frame) order, with each frame's episode bounds.

    Position p is the p-th frame in that order; `rows[p]` is its row in the source table and
    `[start[p], end[p])` the positions of its episode. Built once, vectorised, from Arrow columns.
    """

    rows: np.ndarray  # (N,) int64 row of each position in the source table
    start: np.ndarray  # (N,) int64 first position of the episode
    end: np.ndarray  # (N,) int64 one past the last position of the episode
    state: np.ndarray  # (N, 8) float32
    action: np.ndarray  # (N, 7) float32
    episode: np.ndarray  # (N,) int64
    frame: np.ndarray  # (N,) int64
    instruction_code: np.ndarray  # (N,) int index into `instructions`
    instructions: list[str]

    @classmethod
    def from_table(cls, table: pa.Table) -> "_Frames":
        episode = table.column(EPISODE_INDEX).to_numpy().astype(np.int64)
        frame = table.column(FRAME_INDEX).to_numpy().astype(np.int64)
        rows = np.lexsort((frame, episode))  # stable: already-sorted tables keep their order
        episode, frame = episode[rows], frame[rows]
        new_episode = np.r_[True, episode[1:] != episode[:-1]]  # (N,)
        starts = np.flatnonzero(new_episode)
        lengths = np.diff(np.r_[starts, len(rows)])
        encoded = table.column(INSTRUCTION).combine_chunks().dictionary_encode()
        # both the map-style and the streaming sample paths come through here, so a NaN/inf fails
        # early even when training skips `compute_norm_stats` (statistics given in the config)
        state = _finite(STATE, _float_matrix(table.column(STATE))[rows], episode, frame)
        action = _finite(ACTION, _float_matrix(table.column(ACTION))[rows], episode, frame)
        return cls(
            rows=rows,
            start=np.repeat(starts, lengths),
            end=np.repeat(starts + lengths, lengths),
            state=state,
            action=action,
            episode=episode,
            frame=frame,
            instruction_code=encoded.indices.to_numpy(zero_copy_only=False)[rows],
            instructions=encoded.dictionary.to_pylist(),
        )


def _finite(column: str, values: np.ndarray, episode: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """`values` (N, D) unchanged; `ValueError` naming the column, episode and frame of the first
    non-finite value (in episode, frame order), so corrupt data never reaches the loss as NaN."""
    bad = ~np.isfinite(values)
    if bad.any():
        position, dim = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"column {column!r} holds a non-finite value ({values[position, dim]}) at episode "
                         f"{int(episode[position])}, frame {int(frame[position])}, dimension {dim}; "
                         f"expected finite numbers")
    return values


def _float_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed- or variable-size list column as float32 (N, D)."""
    array = column.combine_chunks()
    width = len(array[0]) if len(array) else 0
    return array.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(array), width)


def _build_samples(
    frames: _Frames, positions: np.ndarray, spec: SampleSpec, take_images: Callable[[np.ndarray], pa.Table] | None,
    random_shift: int = 0,
) -> list[dict[str, Any]]:
    """Samples for `positions` of `frames`: views, state, instruction, action chunk and padding mask.

    Views are the current frame then `num_temporal_frames - 1` past frames `temporal_stride` apart
    (clamped to the episode start), each as [agentview, wrist]. The chunk holds actions
    t .. t + action_horizon - 1; steps past the episode end repeat its last action and are masked.
    `take_images(rows)` returns the camera columns of those source rows as an Arrow table; with
    `take_images=None` the samples carry no `OBS_IMAGES` (their frozen features come from a cache).
    `random_shift` > 0 shifts every view independently (`transforms.random_shift`).
    """
    cameras = _CAMERAS[: spec.num_cameras]
    steps_back = spec.temporal_stride * np.arange(spec.num_temporal_frames)
    context = np.maximum(positions[:, None] - steps_back, frames.start[positions][:, None])  # (B, T)
    chunk = positions[:, None] + np.arange(spec.action_horizon)  # (B, H)
    pad = chunk >= frames.end[positions][:, None]  # (B, H)
    chunk = np.minimum(chunk, frames.end[positions][:, None] - 1)

    views = None
    if take_images is not None:
        # Decode each distinct frame once, even when temporal context repeats it.
        unique, inverse = np.unique(frames.rows[context], return_inverse=True)
        table = take_images(unique)
        decoded = np.stack(
            [np.stack([image_to_chw(image, spec.image_size) for image in table.column(camera).to_pylist()])
             for camera in cameras],
            axis=1,
        )  # (U, C, 3, H, W)
        views = decoded[inverse.reshape(context.shape)]  # (B, T, C, 3, H, W)
        views = views.reshape(len(positions), spec.num_views, *views.shape[-3:])  # (B, S, 3, H, W)
        views = random_shift_images(views, random_shift)

    actions = frames.action[chunk]  # (B, H, 7)
    states = frames.state[positions]  # (B, 8), a copy: samples never alias the cached arrays
    return [
        {
            **({OBS_IMAGES: torch.from_numpy(views[b])} if views is not None else {}),
            OBS_STATE: torch.from_numpy(states[b]),
            INSTRUCTION: frames.instructions[frames.instruction_code[p]],
            ACTIONS: torch.from_numpy(actions[b]),
            ACTIONS_PAD_MASK: torch.from_numpy(pad[b]),
            EPISODE_INDEX: int(frames.episode[p]),
            FRAME_INDEX: int(frames.frame[p]),
        }
        for b, p in enumerate(positions.tolist())
    ]


def _check_canonical(column_names: Sequence[str], where: str) -> None:
    missing = [c for c in CANONICAL_COLUMNS if c not in column_names]
    if missing:
        raise ValueError(
            f"{where} is missing canonical column(s) {missing}; found {list(column_names)} (load it with load_libero)"
        )


class LiberoSamples(torch.utils.data.Dataset):
    """Map-style training samples over a canonical LIBERO `datasets.Dataset` (see `_build_samples`).

    Sample i is the i-th frame in (episode, frame) order. Numeric columns and episode bounds are
    read once from Arrow; images are decoded per sample straight from the Arrow `{bytes, path}`
    structs. `__getitems__` lets a `DataLoader` fetch a whole batch with one Arrow `take`.
    """

    def __init__(self, dataset: datasets.Dataset, spec: SampleSpec, *, images: bool = True,
                 random_shift: int = 0) -> None:
        _check_canonical(dataset.column_names, "LiberoSamples dataset")
        self.spec = spec
        self.images = images  # False: samples without OBS_IMAGES, for training on cached frozen features
        self.random_shift = random_shift  # training augmentation (DataConfig.random_shift); 0 = exact images
        numeric = [EPISODE_INDEX, FRAME_INDEX, STATE, ACTION, INSTRUCTION]
        self._frames = _Frames.from_table(dataset.select_columns(numeric).with_format("arrow")[:])
        self._images = dataset.select_columns(list(_CAMERAS[: spec.num_cameras])).with_format("arrow")

    def without_images(self) -> "LiberoSamples":
        """The same samples without `OBS_IMAGES` (no decoding), sharing this object's frame arrays."""
        samples = copy.copy(self)
        samples.images = False
        return samples

    def __len__(self) -> int:
        return len(self._frames.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        positions = np.asarray(indices, dtype=np.int64)
        if positions.size and (positions.min() < -len(self) or positions.max() >= len(self)):
            raise IndexError(f"sample index out of range for {len(self)} samples: {indices}")
        positions = positions % max(len(self), 1)
        take = (lambda rows: self._images[rows.tolist()]) if self.images else None
        return _build_samples(self._frames, positions, self.spec, take, self.random_shift)


class LiberoSampleStream(torch.utils.data.IterableDataset):
    """Training samples from a streaming (`datasets.IterableDataset`) canonical LIBERO source.

    Rows arrive in file order, one episode after another; each finished episode becomes samples with
    exactly the logic of `LiberoSamples`. Samples are mixed in a buffer of `shuffle_buffer_size`
    (0 = source order), reseeded per epoch with `set_epoch`. Inside `DataLoader` workers each worker
    reads its own parquet shards (or, with fewer shards than workers, its own episodes).
    """

    def __init__(
        self, dataset: datasets.IterableDataset, spec: SampleSpec, *, shuffle_buffer_size: int = 0, seed: int = 0,
        random_shift: int = 0,
    ) -> None:
        if dataset.column_names is not None:
            _check_canonical(dataset.column_names, "LiberoSampleStream dataset")
        self.spec = spec
        self.shuffle_buffer_size = shuffle_buffer_size
        self.seed = seed
        self.random_shift = random_shift
        self.epoch = 0
        self._dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle buffer (and the source's own shuffling) for a new epoch."""
        self.epoch = epoch
        self._dataset.set_epoch(epoch)

    def _worker_part(self) -> datasets.IterableDataset:
        """This DataLoader worker's share: whole parquet shards when there are enough, else every n-th episode."""
        worker = torch.utils.data.get_worker_info()
        if worker is None or worker.num_workers == 1:
            return self._dataset
        if self._dataset.n_shards >= worker.num_workers:  # episodes never span two parquet files
            return self._dataset.shard(num_shards=worker.num_workers, index=worker.id, contiguous=False)
        count, index = worker.num_workers, worker.id
        return self._dataset.filter(lambda batch: (np.asarray(batch[EPISODE_INDEX]) % count == index).tolist(), batched=True)

    def _episodes(self) -> Iterator[pa.Table]:
        """Consecutive rows of one episode at a time, as Arrow tables."""
        pending: list[pa.Table] = []
        for batch in self._worker_part().with_format("arrow").iter(batch_size=256):
            episode = batch.column(EPISODE_INDEX).to_numpy()
            cuts = [0, *(np.flatnonzero(episode[1:] != episode[:-1]) + 1).tolist(), len(episode)]
            for begin, stop in zip(cuts[:-1], cuts[1:]):
                piece = batch.slice(begin, stop - begin)
                if pending and pending[-1].column(EPISODE_INDEX)[0] != piece.column(EPISODE_INDEX)[0]:
                    yield pa.concat_tables(pending)
                    pending = []
                pending.append(piece)
        if pending:
            yield pa.concat_tables(pending)

    def _samples(self) -> Iterator[dict[str, Any]]:
        for table in self._episodes():
            frames = _Frames.from_table(table)
            for begin in range(0, len(frames.rows), 32):
                positions = np.arange(begin, min(begin + 32, len(frames.rows)))
                yield from _build_samples(frames, positions, self.spec, lambda rows, t=table: t.take(pa.array(rows)),
                                          self.random_shift)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.shuffle_buffer_size <= 1:
            yield from self._samples()
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        buffer: list[dict[str, Any]] = []
        for sample in self._samples():
            if len(buffer) < self.shuffle_buffer_size:
                buffer.append(sample)
                continue
            slot = int(rng.integers(len(buffer)))
            yield buffer[slot]
            buffer[slot] = sample
        rng.shuffle(buffer)
        yield from buffer


def build_samples(
    dataset: datasets.Dataset | datasets.IterableDataset, spec: SampleSpec, config: DataConfig | None = None,
    *, train: bool = False,
) -> LiberoSamples | LiberoSampleStream:
    """`LiberoSamples` for a `Dataset`, `LiberoSampleStream` for a streaming one. Only `train` samples
    get `config.random_shift`: validation and inference always see the exact images."""
    shift = config.random_shift if config is not None and train else 0
    if isinstance(dataset, datasets.IterableDataset):
        buffer = config.shuffle_buffer_size if config is not None else 0
        seed = config.split_seed if config is not None else 0
        return LiberoSampleStream(dataset, spec, shuffle_buffer_size=buffer, seed=seed, random_shift=shift)
    return LiberoSamples(dataset, spec, random_shift=shift)


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch samples: tensors stacked along a new dim 0, INSTRUCTION as a list of str, indices as int64.

    This is torch's `default_collate`, which inside a `DataLoader` worker stacks straight into
    shared memory, so a batch crosses to the main process without another copy.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    return torch.utils.data.default_collate(list(samples))
