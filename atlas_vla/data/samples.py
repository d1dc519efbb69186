"""Training samples over a canonical LIBERO table: camera views, state, instruction, action chunk.

`LiberoSamples(dataset, spec)` (or `LiberoSampleStream` for a streaming dataset) builds samples
with the batch keys of `atlas_vla.constants`: camera views decoded straight from the Arrow image
bytes, an action chunk with its padding mask, temporal context; `collate` batches them.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch

from atlas_vla.action_layout import known_actions
from atlas_vla.constants import (
    ACTION,
    ACTIONS,
    ACTIONS_PAD_MASK,
    CAMERAS,
    CANONICAL_COLUMNS,
    EPISODE_INDEX,
    FRAME_INDEX,
    INSTRUCTION,
    OBJECT_POSITIONS,
    OBS_IMAGES,
    OBS_STATE,
    SOURCE_INDEX,
    STATE,
)
from atlas_vla.data.config import DataConfig
from atlas_vla.data.paraphrases import paraphrased
from atlas_vla.data.sources import filter_stream_batches
from atlas_vla.data.spec import SampleSpec
from atlas_vla.data.transforms import image_to_chw
from atlas_vla.data.transforms import shift_cameras


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
    action: np.ndarray  # (N, 7) float32, zero where unknown
    action_known: np.ndarray  # (N,) bool: False for a frame without an action (`action_layout.known_actions`)
    episode: np.ndarray  # (N,) int64
    frame: np.ndarray  # (N,) int64
    instruction_code: np.ndarray  # (N,) int index into `instructions`
    instructions: list[str]
    positions: np.ndarray | None = None  # (N, 6) float32 OBJECT_POSITIONS (NaN where unknown), when the table has them

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
        positions = (_float_matrix(table.column(OBJECT_POSITIONS))[rows]
                     if OBJECT_POSITIONS in table.column_names else None)
        action = _float_matrix(table.column(ACTION))[rows]
        known = known_actions(action, positions, lambda p: f"at episode {int(episode[p])}, frame {int(frame[p])}")
        return cls(
            rows=rows,
            start=np.repeat(starts, lengths),
            end=np.repeat(starts + lengths, lengths),
            state=state,
            action=np.where(known[:, None], action, 0.0).astype(np.float32),
            action_known=known,
            episode=episode,
            frame=frame,
            instruction_code=encoded.indices.to_numpy(zero_copy_only=False)[rows],
            instructions=encoded.dictionary.to_pylist(),
            positions=positions,
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
    random_shift: int | Sequence[int] = 0, paraphrase_prob: float = 0.0, paraphrase_seed: int = 0,
) -> list[dict[str, Any]]:
    """Samples for `positions` of `frames`: views, state, instruction, action chunk and padding mask.

    Views are the current frame then `num_temporal_frames - 1` past frames `temporal_stride` apart
    (clamped to the episode start), each as [agentview, wrist]. The chunk holds actions
    t .. t + action_horizon - 1; steps past the episode end repeat its last action and are masked, as are steps
    whose frame has no action (zero in the chunk).
    `take_images(rows)` returns the camera columns of those source rows as an Arrow table; with
    `take_images=None` the samples carry no `OBS_IMAGES` (their frozen features come from a cache). When the
    table says where the objects are, each sample carries its current frame's `OBJECT_POSITIONS`.
    `random_shift` (pixels, or one per camera) shifts every view independently (`transforms.shift_cameras`). `paraphrase_prob` of the
    samples read a paraphrase of their instruction, drawn from (`paraphrase_seed`, episode, frame).
    """
    cameras = CAMERAS[: spec.num_cameras]
    steps_back = spec.temporal_stride * np.arange(spec.num_temporal_frames)
    context = np.maximum(positions[:, None] - steps_back, frames.start[positions][:, None])  # (B, T)
    chunk = positions[:, None] + np.arange(spec.action_horizon)  # (B, H)
    chunk_end = frames.end[positions][:, None]
    chunk = np.minimum(chunk, chunk_end - 1)
    pad = (positions[:, None] + np.arange(spec.action_horizon) >= chunk_end) | ~frames.action_known[chunk]  # (B, H)

    views = None
    if take_images is not None:
        # Decode each distinct frame once, even when temporal context repeats it.
        unique, inverse = np.unique(frames.rows[context], return_inverse=True)
        table = take_images(unique)
        decoded = np.stack([_decode_column(table, camera, spec.image_size, frames, unique) for camera in cameras],
                           axis=1)  # (U, C, 3, H, W)
        views = decoded[inverse.reshape(context.shape)]  # (B, T, C, 3, H, W)
        views = views.reshape(len(positions), spec.num_views, *views.shape[-3:])  # (B, S, 3, H, W)
        views = shift_cameras(views, random_shift, len(cameras))

    actions = frames.action[chunk]  # (B, H, 7)
    states = frames.state[positions]  # (B, 8), a copy: samples never alias the cached arrays
    return [
        {
            **({OBS_IMAGES: torch.from_numpy(views[b])} if views is not None else {}),
            OBS_STATE: torch.from_numpy(states[b]),
            INSTRUCTION: paraphrased(frames.instructions[frames.instruction_code[p]], paraphrase_prob,
                                     (paraphrase_seed, int(frames.episode[p]), int(frames.frame[p]))),
            ACTIONS: torch.from_numpy(actions[b]),
            ACTIONS_PAD_MASK: torch.from_numpy(pad[b]),
            EPISODE_INDEX: int(frames.episode[p]),
            FRAME_INDEX: int(frames.frame[p]),
            **({OBJECT_POSITIONS: torch.from_numpy(frames.positions[p].copy())}
               if frames.positions is not None else {}),
        }
        for b, p in enumerate(positions.tolist())
    ]


def _decode_column(table: pa.Table, camera: str, size: int, frames: _Frames, rows: np.ndarray) -> np.ndarray:
    """The `camera` images of source `rows` as (U, 3, size, size); a frame that does not decode fails with
    its column, episode, frame and (for an image stored as a file) the file."""
    images = []
    for row, image in zip(rows.tolist(), table.column(camera).to_pylist()):
        try:
            images.append(image_to_chw(image, size))
        except ValueError as error:
            position = int(np.flatnonzero(frames.rows == row)[0])
            path = image.get("path") if isinstance(image, dict) else None
            raise ValueError(f"column {camera!r}, episode {int(frames.episode[position])}, frame "
                             f"{int(frames.frame[position])}{f', file {path}' if path else ''}: {error}") from None
    return np.stack(images)


def _image_bytes(image: Any) -> bytes:
    """What identifies one stored image for `LiberoSamples.fingerprint`: its encoded bytes, or the path and
    bytes of its file, or (decoded pixels) the array's bytes."""
    if isinstance(image, Mapping):
        if image.get("bytes") is not None:
            return image["bytes"]
        path = image.get("path") or ""
        return path.encode() + (Path(path).read_bytes() if path and Path(path).is_file() else b"")
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    return np.ascontiguousarray(np.asarray(image)).tobytes()


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
                 random_shift: int | Sequence[int] = 0, paraphrase_prob: float = 0.0, paraphrase_seed: int = 0) -> None:
        _check_canonical(dataset.column_names, "LiberoSamples dataset")
        self.spec = spec
        self.images = images  # False: samples without OBS_IMAGES, for training on cached frozen features
        self.random_shift = random_shift  # training augmentation (DataConfig.random_shift); 0 = exact images
        self.paraphrase_prob = paraphrase_prob  # training augmentation (DataConfig.paraphrase_prob); 0 = recorded words
        self.paraphrase_seed = paraphrase_seed
        joined = SOURCE_INDEX in dataset.column_names  # several sources
        numeric = [EPISODE_INDEX, FRAME_INDEX, STATE, ACTION, INSTRUCTION, *([SOURCE_INDEX] if joined else []),
                   *([OBJECT_POSITIONS] if OBJECT_POSITIONS in dataset.column_names else [])]
        table = dataset.select_columns(numeric).with_format("arrow")[:]
        self._frames = _Frames.from_table(table)
        # the source of each sample (in sample order), for source-weighted sampling
        self.sample_sources = table.column(SOURCE_INDEX).to_numpy()[self._frames.rows] if joined else None
        self._images = dataset.select_columns(list(CAMERAS[: spec.num_cameras])).with_format("arrow")

    def without_images(self) -> "LiberoSamples":
        """The same samples without `OBS_IMAGES` (no decoding), sharing this object's frame arrays."""
        samples = copy.copy(self)
        samples.images = False
        return samples

    def fingerprint(self, batch_size: int = 1024) -> str:
        """A content hash (32 hex chars) of every sample's inputs, in sample order: episode, frame, state,
        action, instruction, and the stored bytes of each camera image (or, for an image kept as a file,
        its path and the file's bytes), and which frames have no action. Two sample sets with the same fingerprint
        give the same samples (the same images and recorded instructions: paraphrasing and shifting, training's
        augmentations, come after)."""
        frames = self._frames
        digest = hashlib.blake2b(digest_size=16)
        for array in (frames.episode, frames.frame, frames.state, frames.action, frames.instruction_code):
            digest.update(np.ascontiguousarray(array).tobytes())
        if not frames.action_known.all():  # only then: data where every frame has an action keeps its fingerprint
            digest.update(frames.action_known.tobytes())
        digest.update("\0".join(frames.instructions).encode())
        for start in range(0, len(frames.rows), batch_size):
            table = self._images[frames.rows[start:start + batch_size].tolist()]
            for camera in table.column_names:
                for image in table.column(camera).to_pylist():
                    digest.update(_image_bytes(image))
        return digest.hexdigest()

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
        samples = _build_samples(self._frames, positions, self.spec, take, self.random_shift, self.paraphrase_prob,
                                 self.paraphrase_seed)
        if self.sample_sources is not None:  # several sources: which one each sample came from
            for sample, position in zip(samples, positions.tolist()):
                sample[SOURCE_INDEX] = int(self.sample_sources[position])
        return samples


class LiberoSampleStream(torch.utils.data.IterableDataset):
    """Training samples from a streaming (`datasets.IterableDataset`) canonical LIBERO source.

    Rows arrive in file order, one episode after another; each finished episode becomes samples with
    exactly the logic of `LiberoSamples`. Samples are mixed in a buffer of `shuffle_buffer_size`
    (0 = source order), reseeded per epoch with `set_epoch`. Inside `DataLoader` workers each worker
    reads its own parquet shards (or, with fewer shards than workers, its own episodes).
    """

    def __init__(
        self, dataset: datasets.IterableDataset, spec: SampleSpec, *, shuffle_buffer_size: int = 0, seed: int = 0,
        random_shift: int | Sequence[int] = 0, paraphrase_prob: float = 0.0, paraphrase_seed: int = 0,
    ) -> None:
        if dataset.column_names is not None:
            _check_canonical(dataset.column_names, "LiberoSampleStream dataset")
        self.spec = spec
        self.shuffle_buffer_size = shuffle_buffer_size
        self.seed = seed
        self.random_shift = random_shift
        self.paraphrase_prob = paraphrase_prob
        self.paraphrase_seed = paraphrase_seed
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
        return filter_stream_batches(self._dataset,
                                     lambda batch: batch.column(EPISODE_INDEX).to_numpy() % count == index)

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
                                          self.random_shift, self.paraphrase_prob, self.paraphrase_seed)

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
    get `config.random_shift` and `config.paraphrase_prob`: validation and inference always see the exact images
    and the recorded instructions."""
    shift = config.random_shift if config is not None and train else 0
    paraphrase_prob = config.paraphrase_prob if config is not None and train else 0.0
    seed = config.split_seed if config is not None else 0
    if isinstance(dataset, datasets.IterableDataset):
        buffer = config.shuffle_buffer_size if config is not None else 0
        return LiberoSampleStream(dataset, spec, shuffle_buffer_size=buffer, seed=seed, random_shift=shift,
                                  paraphrase_prob=paraphrase_prob, paraphrase_seed=seed)
    return LiberoSamples(dataset, spec, random_shift=shift, paraphrase_prob=paraphrase_prob, paraphrase_seed=seed)


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch samples: tensors stacked along a new dim 0, INSTRUCTION as a list of str, indices as int64.

    This is torch's `default_collate`, which inside a `DataLoader` worker stacks straight into
    shared memory, so a batch crosses to the main process without another copy.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    return torch.utils.data.default_collate(list(samples))
