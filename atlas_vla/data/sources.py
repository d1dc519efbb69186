"""LIBERO sources -> one `datasets` table with the canonical columns of `atlas_vla.constants`.

`load_libero(source)` turns any LIBERO source (a Hub dataset id, a local LeRobot v2.x or v3.0
folder, a `Dataset.save_to_disk` folder) into one table, one row per frame. The layout and the
column schema are detected from what is on disk, never guessed: anything unexpected is one
`ValueError` saying what was found. `describe(source)` summarises a source from its metadata.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from atlas_vla.constants import (
    ACTION,
    AGENT_IMAGE,
    CAMERAS,
    CANONICAL_COLUMNS,
    EPISODE_INDEX,
    FRAME_INDEX,
    INSTRUCTION,
    OBJECT_POSITIONS,
    STATE,
    TASK_INDEX,
    WRIST_IMAGE,
)
from atlas_vla.data.config import check_column_overrides, missing_source_message, nearest_source
from atlas_vla.data.hdf5 import convert_libero_hdf5, find_hdf5_files
from atlas_vla.files import StagedFolder, read_json
from atlas_vla.hub import hub_failure, local_path_or_hub_id

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
EXTRA_COLUMNS = (TASK_INDEX, OBJECT_POSITIONS)  # kept beside CANONICAL_COLUMNS when a source has them
OPTIONAL_COLUMNS = (INSTRUCTION, *EXTRA_COLUMNS)  # mapped when present; instructions are joined otherwise


@dataclass
class _Source:
    """A located source: its local folder (a Hub snapshot for Hub ids) and its metadata."""

    root: Path
    layout: str
    repo_id: str | None = None  # set for Hub sources
    commit: str | None = None  # the Hub commit the snapshot belongs to
    info: dict = field(default_factory=dict)  # LeRobot meta/info.json
    tasks: dict[int, str] = field(default_factory=dict)  # task_index -> instruction
    origin: Path | None = None  # raw HDF5 files that `root` was converted from

    def describe_name(self) -> str:
        return self.repo_id or str(self.origin or self.root)


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
        version = str(read_json(info_path).get("codebase_version", ""))
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
    The result has `CANONICAL_COLUMNS` (plus `TASK_INDEX` and `OBJECT_POSITIONS` when the source has them); images stay
    encoded in the table (decoded to PIL on access).
    """
    dataset, _ = load_libero_with_episodes(
        source,
        revision=revision,
        streaming=streaming,
        columns=columns,
        split=split,
        max_episodes=max_episodes,
        cache_dir=cache_dir,
    )
    return dataset


def load_libero_with_episodes(
    source: str,
    *,
    revision: str | None,
    streaming: bool,
    columns: Mapping[str, str] | None,
    split: str,
    max_episodes: int | None,
    cache_dir: str | None,
) -> tuple[datasets.Dataset | datasets.IterableDataset, list[int]]:
    """`load_libero`, also returning the episode indices the result holds (what `split_episodes` needs
    for a stream, whose rows cannot be scanned)."""
    check_column_overrides(columns or {})
    src = _open_source(source, revision=revision, cache_dir=cache_dir)
    if src.layout == LAYOUT_SAVED:
        dataset = _load_saved(src.root, split)
        mapping, _ = resolve_columns(dataset.column_names, columns, where=str(src.root))
        available = np.unique(numpy_column(dataset, mapping[EPISODE_INDEX])).tolist()
        keep = available[:max_episodes]
        dataset = select_episodes(dataset, mapping[EPISODE_INDEX], keep if keep != available else None)
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
            for optional in OPTIONAL_COLUMNS:  # kept under their own names when the source has them
                if optional not in mapping and optional in found_set:
                    mapping[optional] = optional
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


def _open_source(source: str, *, revision: str | None, cache_dir: str | None) -> _Source:
    """Locate `source` (local folder, or a Hub id whose metadata is fetched), detect its layout, read its metadata."""
    found = local_path_or_hub_id(source, missing_source_message(source))
    repo_id = commit = None
    origin = None
    if isinstance(found, Path):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub dataset ids only, but {source!r} is a local folder")
        root = found
        if is_raw_hdf5(found):
            root, origin = _converted_hdf5(found, cache_dir), found
    else:
        root, repo_id = _download(found, revision=revision, cache_dir=cache_dir, patterns=["meta/*"]), found
        commit = root.name  # snapshot folders are named by commit hash
    src = _Source(root=root, layout=detect_layout(root), repo_id=repo_id, commit=commit, origin=origin)
    if src.layout != LAYOUT_SAVED:
        src.info = read_json(root / "meta" / "info.json")
        src.tasks = _read_tasks(root, src.layout)
    return src


def is_raw_hdf5(path: Path) -> bool:
    """A raw LIBERO `*.hdf5` file, or a folder of them that is not itself a dataset folder."""
    if path.is_file():
        return path.suffix in (".hdf5", ".h5")
    dataset_markers = (path / "meta" / "info.json", path / "dataset_info.json", path / "dataset_dict.json")
    return not any(marker.exists() for marker in dataset_markers) and any(path.glob("*.hdf5"))


def _converted_hdf5(path: Path, cache_dir: str | None) -> Path:
    """Raw LIBERO HDF5 files as a LeRobot v2 folder, converted once with `convert_libero_hdf5`'s defaults
    (images rotated upright, no no-op filter) into a cache folder keyed by the files' paths, sizes and
    modification times; `atlas-vla convert-libero-hdf5` gives the other options."""
    files = find_hdf5_files([path])
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "atlas_vla_hdf5" / digest.hexdigest()[:16]
    if not root.exists():
        convert_libero_hdf5(files, root)
    return root


def convert_libero_hdf5_to_dataset(inputs: Sequence[str | Path], output: str | Path, *, overwrite: bool = False,
                                   **options: Any) -> Path:
    """Raw LIBERO HDF5 files as one `Dataset.save_to_disk` folder at `output`, with the canonical columns
    `load_libero` gives; `options` are `hdf5.convert_libero_hdf5`'s (rotate, image_size, filter_noops, fps).

    The files are converted to a LeRobot v2 folder beside `output` first, which goes when done; the output
    appears only when complete."""
    output = Path(output).expanduser()
    if output.exists() and not overwrite:
        raise ValueError(f"output folder already exists: {output} (pass --overwrite to replace it)")
    files = find_hdf5_files(inputs)  # a missing input fails before any folder is made
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.v2-", dir=output.parent) as staging:
        converted = convert_libero_hdf5(files, Path(staging) / "v2", **options)
        with StagedFolder(output) as staged:
            load_libero(str(converted)).save_to_disk(str(staged.path))
    return output


def _download(repo_id: str, *, revision: str | None, cache_dir: str | None, patterns: list[str]) -> Path:
    """Snapshot the files of a Hub dataset repo that match `patterns` into the HF cache; returns the snapshot."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, repo_type="dataset", revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except (OSError, ValueError) as error:  # hub errors: not found, offline and not cached, bad revision
        nearest = nearest_source(repo_id)
        raise ValueError(f"could not get Hub dataset {repo_id!r} (revision {revision or 'main'}): {hub_failure(error)}"
                         + (f" (no such local folder either; did you mean {nearest}?)" if nearest else "")) from error
    return Path(folder)


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
    bad = [mapping[c] for c in CAMERAS if mapping[c] in videos]
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
        dataset = select_episodes(dataset, mapping[EPISODE_INDEX], keep)
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


def numpy_column(dataset: datasets.Dataset, column: str) -> np.ndarray:
    """One column as a NumPy array, read from Arrow without touching the other columns."""
    return np.asarray(dataset.select_columns([column]).with_format("numpy")[:][column])


def select_episodes(
    dataset: datasets.Dataset | datasets.IterableDataset, column: str, episodes: Sequence[int] | None
) -> datasets.Dataset | datasets.IterableDataset:
    """Rows whose `column` is in `episodes` (None = all); vectorised, no data is copied."""
    if episodes is None:
        return dataset
    wanted = np.asarray(sorted(episodes), dtype=np.int64)
    if isinstance(dataset, datasets.IterableDataset):  # Arrow batches: the images are not decoded to filter
        return filter_stream_batches(dataset, lambda batch: np.isin(batch.column(column).to_numpy(), wanted))
    return dataset.select(np.flatnonzero(np.isin(numpy_column(dataset, column), wanted)))


def map_stream_batches(stream: datasets.IterableDataset, function: Callable[[pa.Table], pa.Table],
                       features: datasets.Features | None) -> datasets.IterableDataset:
    """`stream.map` on Arrow tables: a step that only touches other columns never decodes (and re-encodes)
    the stream's images, so they are decoded once, by the sample builder."""
    return stream.with_format("arrow").map(function, batched=True, features=features).with_format(None)


def filter_stream_batches(stream: datasets.IterableDataset,
                          keep: Callable[[pa.Table], np.ndarray]) -> datasets.IterableDataset:
    """`stream.filter` on Arrow tables (`keep` gives one bool per row), without decoding any image."""
    return stream.with_format("arrow").filter(lambda batch: pa.array(keep(batch)), batched=True).with_format(None)


def _to_canonical(
    dataset: datasets.Dataset | datasets.IterableDataset, mapping: dict[str, str], tasks: dict[int, str], *, where: str
) -> datasets.Dataset | datasets.IterableDataset:
    """Select + rename the mapped columns, make the cameras `datasets.Image`, join the instructions."""
    renames = {source: canonical for canonical, source in mapping.items() if source != canonical}
    dataset = dataset.select_columns(list(mapping.values()))
    if isinstance(dataset, datasets.IterableDataset) and renames:  # a stream renames in Arrow, never decoding images
        features = dataset.features
        features = datasets.Features({renames.get(k, k): v for k, v in features.items()}) if features else None
        dataset = map_stream_batches(
            dataset, lambda batch: batch.rename_columns([renames.get(name, name) for name in batch.column_names]),
            features)
    elif renames:
        dataset = dataset.rename_columns(renames)
    features = dataset.features
    for camera in CAMERAS:
        feature = features[camera] if features is not None else None
        if feature is not None and not isinstance(feature, datasets.Image):
            if not (isinstance(feature, dict) and set(feature) == {"bytes", "path"}):
                raise ValueError(f"{where}: column {mapping[camera]!r} is {feature}, expected an image ({{bytes, path}} struct)")
            dataset = dataset.cast_column(camera, datasets.Image())
    if INSTRUCTION not in mapping:
        dataset = _join_instructions(dataset, tasks, has_task_index=TASK_INDEX in mapping, where=where)
    return dataset.select_columns([*CANONICAL_COLUMNS, *(c for c in EXTRA_COLUMNS if c in mapping)])


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

        def add_instructions(batch: pa.Table) -> pa.Table:  # Arrow in and out: images are never decoded here
            return batch.append_column(INSTRUCTION, pa.array(lookup(batch.column(TASK_INDEX).to_pylist()), pa.string()))

        return map_stream_batches(dataset, add_instructions, features)
    codes = numpy_column(dataset, TASK_INDEX)
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
    check_column_overrides(columns or {})
    src = _open_source(source, revision=revision, cache_dir=cache_dir)
    if src.layout == LAYOUT_SAVED:
        dataset = _load_saved(src.root, split)
        mapping, schema = resolve_columns(dataset.column_names, columns, where=str(src.root))
        if INSTRUCTION not in mapping:
            raise ValueError(f"{src.root}: a saved dataset needs an {INSTRUCTION!r} column; found {dataset.column_names}")
        episode_ids = np.unique(numpy_column(dataset, mapping[EPISODE_INDEX])).tolist()
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
