"""FeatureStore: the frozen backbone's outputs for a run's training samples, computed once and kept on disk.

Atlas's VGGT is frozen, so what it computes for a training sample never changes. A store holds, for every
training sample of a run and each of `copies` differently shifted versions of it (`data.random_shift`),
exactly what the fusion reads from the backbone (`AtlasPolicy.vision_features`: each selected layer's camera
token and, pooled if `model.fusion.spatial_pool` is set, patch tokens) as float16. Training then reads these
instead of running the backbone, so runs, DDP ranks and sweep trials that agree on the `StoreKey` share one
backbone pass. VGGT attends across all frames of a sample (cameras x temporal frames), so the store keeps
whole samples, and temporal context is part of the key.

A store is a folder:

    store.json                       format, key, per-sample shape, copies, dtype and the list of shards
    features-00000.safetensors ...   tensor "features" (n, copies, L, S, T, 2C) for samples [first, first + n)

Each shard is a plain safetensors file (`safetensors.safe_open(path, "pt")` reads it without atlas-vla).
`build_store` writes the shards into `.NAME.partial` beside the target, each one atomically, split
round-robin between processes, and renames the folder into place when every shard is there: a killed build
resumes at the first missing shard, and what it produces does not depend on the number of processes (each
sample's shifts come from its own seed and the backbone batches never cross a shard boundary).
`FeatureStore` reads one sample copy with one positional read (`os.pread`): nothing is mapped or kept in the
process, so resident memory does not grow with the store (the operating system's page cache does the
caching).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from atlas_vla.constants import OBS_IMAGES, OBS_VISION_FEATURES
from atlas_vla.data.config import shifts_anything
from atlas_vla.data.samples import LiberoSamples, collate
from atlas_vla.files import staged_file, swap_in_folder, write_json_atomic

FORMAT = "atlas-vla/feature-store/1"
# what a sample's stored features are (token selection, dtype cast, the seeds of the shifted copies): change
# it whenever that changes, so stores written by older code are refused rather than read as if they matched
FEATURE_CODE_VERSION = 1
MANIFEST = "store.json"
TENSOR = "features"
SHARD_BYTES = 512 * 2**20  # a shard's target size: small enough that a killed build loses little
# samples per backbone batch while building: fixed, because a batch's size can change the last bits of the
# backbone's outputs, and a key must mean the same bytes whatever run (and training batch size) built it
BUILD_BATCH_SIZE = 32
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class StoreKey:
    """Everything a store's contents depend on: two runs with equal keys would store identical features."""

    data: str  # `LiberoSamples.fingerprint()` of the training samples: frames, instructions, image bytes
    num_samples: int
    backbone: str  # content hash of the frozen VGGT weights
    backbone_precision: str  # what the backbone computed in: "float32", or "bfloat16" (autocast on a GPU)
    layers: tuple[int, ...]
    image_size: int
    cameras: int
    temporal_frames: int
    temporal_stride: int
    spatial_pool: int | None
    random_shift: int | list[int]
    copies: int
    dtype: str
    feature_code: int = FEATURE_CODE_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"feature store dtype {self.dtype!r} is not supported; expected one of {list(DTYPES)}")
        if self.copies < 1:
            raise ValueError(f"feature store copies must be >= 1, got {self.copies}")

    @classmethod
    def for_policy(cls, policy: Any, samples: LiberoSamples, *, copies: int, device_type: str,
                   dtype: str = "float16") -> "StoreKey":
        """The key of `policy`'s (an `AtlasPolicy`) frozen features for `samples`, computed on `device_type`."""
        config, spec = policy.config, policy.config.sample_spec
        return cls(data=samples.fingerprint(), num_samples=len(samples),
                   backbone=policy.frozen.vggt.weights_hash(),
                   backbone_precision="bfloat16" if device_type == "cuda" else "float32",
                   layers=tuple(config.vggt_layers), image_size=spec.image_size, cameras=spec.num_cameras,
                   temporal_frames=spec.num_temporal_frames, temporal_stride=spec.temporal_stride,
                   spatial_pool=config.fusion.spatial_pool, random_shift=samples.random_shift, copies=copies,
                   dtype=dtype)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> "StoreKey":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) != names:
            found = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise ValueError(f"{where}: 'key' holds {found}; expected the fields {sorted(names)}")
        return cls(**{**values, "layers": tuple(values["layers"])})

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}

    def digest(self) -> str:
        """16 hex chars naming this key (the folder name of an `auto` store)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: "StoreKey") -> list[str]:
        """'field: X in the store, Y for this run' for every field where `self` (the store's) and `other` differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{name}: {mine[name]!r} in the store, {theirs[name]!r} for this run" for name in mine
                if mine[name] != theirs[name]]


def _shift_seed(index: int, copy: int) -> int:
    """The seed of sample `index`'s shifts in copy `copy`: its own, so a sample's copies do not depend on
    which process, batch or resumed build computed them."""
    return int(np.random.SeedSequence([FEATURE_CODE_VERSION, copy, index]).generate_state(1)[0])


def _sample_with_images(samples: LiberoSamples, index: int, copy: int) -> dict[str, Any]:
    if not shifts_anything(samples.random_shift):
        return samples[index]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_shift_seed(index, copy))
        return samples[index]


def _plan(num_samples: int, sample_bytes: int, copies: int, shard_bytes: int) -> list[dict[str, int]]:
    per_shard = max(1, shard_bytes // (sample_bytes * copies))
    return [{"first": first, "count": min(per_shard, num_samples - first)}
            for first in range(0, num_samples, per_shard)]


def _shard_name(index: int) -> str:
    return f"features-{index:05d}.safetensors"


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(safetensors header, offset of the data buffer) of `path`; ValueError when it is not one."""
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: {len(prefix)} bytes, not a safetensors file (truncated?)")
        length = int.from_bytes(prefix, "little")
        raw = file.read(length)
    if len(raw) < length:
        raise ValueError(f"{path}: the safetensors header is cut short at {len(raw)} of {length} bytes (truncated)")
    try:
        return json.loads(raw), 8 + length
    except ValueError:
        raise ValueError(f"{path}: the safetensors header is not JSON (corrupt file)") from None


def _check_shard(path: Path, count: int, copies: int, shape: Sequence[int], dtype: str) -> int:
    """The byte offset of `path`'s features after checking its tensor and its size; ValueError naming what
    differs (a truncated or foreign file)."""
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    header, data_start = _read_header(path)
    entry = header.get(TENSOR)
    expected = [count, copies, *shape]
    safetensors_dtype = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[dtype]
    if not isinstance(entry, dict) or entry.get("shape") != expected or entry.get("dtype") != safetensors_dtype:
        found = {k: entry.get(k) for k in ("shape", "dtype")} if isinstance(entry, dict) else None
        raise ValueError(f"{path}: tensor {TENSOR!r} is {found}; expected shape {expected}, dtype {safetensors_dtype}")
    begin, end = entry["data_offsets"]
    size, expected_size = path.stat().st_size, data_start + end
    if size != expected_size:
        raise ValueError(f"{path} is truncated: {size} bytes, expected {expected_size}")
    return data_start + begin


class FeatureStore:
    """A complete store on disk: its key and layout, and one sample copy's features by positional read."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise ValueError(f"{self.path} is not a feature store: {MANIFEST} is missing (build one with "
                             f"`atlas-vla cache-features` or training.feature_store)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError:
            raise ValueError(f"{manifest_path}: not valid JSON") from None
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        self.key = StoreKey.from_dict(manifest.get("key"), str(manifest_path))
        self.shape = tuple(manifest["sample_shape"])
        self.copies = self.key.copies
        self.num_samples = self.key.num_samples
        self._shards = manifest["shards"]
        self._dtype = self.key.dtype
        self.sample_bytes = int(np.prod(self.shape)) * DTYPES[self._dtype].itemsize
        covered = sum(shard["count"] for shard in self._shards)
        if covered != self.num_samples:
            raise ValueError(f"{manifest_path}: its shards hold {covered} samples, its key says {self.num_samples}")
        self._offsets = []
        for index, shard in enumerate(self._shards):
            try:
                self._offsets.append(_check_shard(self.path / _shard_name(index), shard["count"], self.copies,
                                                  self.shape, self._dtype))
            except ValueError as error:
                raise ValueError(f"feature store {self.path}: {error}; delete the store to build it again") from None
        self._firsts = np.array([shard["first"] for shard in self._shards], dtype=np.int64)
        self._files: dict[int, int] = {}
        self._pid = os.getpid()

    @property
    def nbytes(self) -> int:
        return self.num_samples * self.copies * self.sample_bytes

    def check_key(self, key: StoreKey) -> None:
        """ValueError naming every field where this store's key differs from `key`."""
        differences = self.key.differences(key)
        if differences:
            raise ValueError(f"feature store {self.path} was built for other inputs: " + "; ".join(differences)
                             + " (point training.feature_store elsewhere, use auto, or delete the store)")

    def _descriptor(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own files
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = os.open(self.path / _shard_name(shard), os.O_RDONLY)
        return self._files[shard]

    def read(self, index: int, copy: int) -> Tensor:
        """Copy `copy` of sample `index`'s features (L, S, T, 2C), read from disk."""
        if not (0 <= index < self.num_samples and 0 <= copy < self.copies):
            raise IndexError(f"feature store {self.path}: sample {index} copy {copy} out of range "
                             f"({self.num_samples} samples x {self.copies} copies)")
        shard = int(np.searchsorted(self._firsts, index, side="right") - 1)
        position = (index - int(self._firsts[shard])) * self.copies + copy
        data = os.pread(self._descriptor(shard), self.sample_bytes,
                        self._offsets[shard] + position * self.sample_bytes)
        if len(data) != self.sample_bytes:
            raise ValueError(f"feature store {self.path}: {_shard_name(shard)} ended early reading sample {index}")
        return torch.frombuffer(bytearray(data), dtype=DTYPES[self._dtype]).reshape(self.shape)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}  # descriptors stay with the process that opened them

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for descriptor in self._files.values():
                os.close(descriptor)


def is_complete(path: str | os.PathLike) -> bool:
    """Whether `path` holds a finished store (its manifest is written last, when every shard is in place)."""
    return (Path(path) / MANIFEST).is_file()


def build_store(path: str | os.PathLike, samples: LiberoSamples, encode: Callable[[Tensor], Tensor],
                key: StoreKey, sample_shape: Sequence[int], *, batch_size: int = BUILD_BATCH_SIZE,
                process_index: int = 0, num_processes: int = 1, wait_for_everyone: Callable[[], None] = lambda: None,
                progress: bool = True, shard_bytes: int = SHARD_BYTES) -> FeatureStore:
    """Run `encode` (uint8 images (B, S, 3, H, W) -> features (B, *sample_shape)) over `key.copies` versions of
    every sample of `samples` and write the store to `path`; every process of a run calls it with its index.

    Shards go round-robin to processes; finished shards of an interrupted build with the same key are kept.
    """
    if not isinstance(samples, LiberoSamples) or not samples.images:
        raise ValueError(f"a feature store is built from map-style LiberoSamples with images, got "
                         f"{type(samples).__name__} (a streaming dataset cannot be stored)")
    if len(samples) != key.num_samples or not len(samples):
        raise ValueError(f"build_store: {len(samples)} samples, the key says {key.num_samples}")
    target = Path(path)
    if target.exists():  # never replace a folder that is not a store: it may hold someone's files
        raise ValueError(f"{target} exists and is not a finished feature store ({MANIFEST} is missing); "
                         f"choose another folder or remove it")
    partial = target.parent / f".{target.name}.partial"
    sample_bytes = int(np.prod(sample_shape)) * DTYPES[key.dtype].itemsize
    manifest = {"format": FORMAT, "key": key.to_dict(), "sample_shape": list(sample_shape), "batch_size": batch_size,
                "shards": _plan(key.num_samples, sample_bytes, key.copies, shard_bytes)}
    if process_index == 0:
        _prepare_partial(partial, manifest)
    wait_for_everyone()
    manifest = json.loads((partial / "plan.json").read_text())  # the plan of the build being resumed, if any
    shards = list(enumerate(manifest["shards"]))[process_index::num_processes]
    todo = [(index, shard) for index, shard in shards if not _shard_done(partial, index, shard, manifest)]
    frames = sum(shard["count"] for _, shard in todo) * key.copies * sample_shape[1]
    with tqdm(total=frames, unit="frame", unit_scale=True, desc="building the feature store",
              disable=not progress) as bar:
        written = 0
        for index, shard in todo:
            features = _encode_shard(samples, encode, shard, key, sample_shape, manifest["batch_size"], bar)
            with staged_file(partial / _shard_name(index)) as tmp:
                save_file({TENSOR: features}, str(tmp), metadata={"first": str(shard["first"])})
            written += features.numel() * features.element_size()
            bar.set_postfix_str(f"{written / 1e9:.2f} GB written")
    wait_for_everyone()
    if process_index == 0:
        names = {_shard_name(index) for index in range(len(manifest["shards"]))}
        for index, shard in enumerate(manifest["shards"]):
            _check_shard(partial / _shard_name(index), shard["count"], key.copies, sample_shape, key.dtype)
        for leftover in partial.iterdir():  # the plan, and a killed build's half-written temporary shard
            if leftover.name not in names:
                leftover.unlink()
        write_json_atomic(partial / MANIFEST, manifest)
        swap_in_folder(partial, target)
    wait_for_everyone()
    return FeatureStore(target)


def _prepare_partial(partial: Path, manifest: dict[str, Any]) -> None:
    """Keep an interrupted build of the same key (and plan); start over for anything else."""
    plan = partial / "plan.json"
    if partial.exists():
        try:
            previous = json.loads(plan.read_text())
        except (OSError, ValueError):
            previous = None
        if previous == manifest:
            return
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    write_json_atomic(plan, manifest)


def _shard_done(partial: Path, index: int, shard: dict[str, int], manifest: dict[str, Any]) -> bool:
    try:
        _check_shard(partial / _shard_name(index), shard["count"], manifest["key"]["copies"],
                     manifest["sample_shape"], manifest["key"]["dtype"])
        return True
    except ValueError:
        return False


def _encode_shard(samples: LiberoSamples, encode: Callable[[Tensor], Tensor], shard: dict[str, int],
                  key: StoreKey, sample_shape: Sequence[int], batch_size: int, bar: tqdm) -> Tensor:
    first, count = shard["first"], shard["count"]
    features = torch.empty((count, key.copies, *sample_shape), dtype=DTYPES[key.dtype])
    for copy in range(key.copies):
        for start in range(first, first + count, batch_size):
            indices = range(start, min(start + batch_size, first + count))
            batch = collate([_sample_with_images(samples, index, copy) for index in indices])
            with torch.no_grad():
                out = encode(batch[OBS_IMAGES]).to("cpu", DTYPES[key.dtype])
            if tuple(out.shape[1:]) != tuple(sample_shape):
                raise ValueError(f"the backbone gave features of shape {tuple(out.shape[1:])} per sample; the store "
                                 f"expects {tuple(sample_shape)}")
            features[start - first:start - first + len(indices), copy] = out
            bar.update(len(indices) * sample_shape[1])
    return features


class StoredFeatureSamples(torch.utils.data.Dataset):
    """`LiberoSamples` whose frozen features come from a `FeatureStore`: sample i is `samples[i]` without its
    images, plus `OBS_VISION_FEATURES` = one of the store's copies of sample i. With `images=True` (a policy with
    a pixel stem, which reads the pixels too) it keeps its images, shifted exactly as that copy's were when the
    store was built, so both views of a sample show the same scene.

    The copy is drawn from (`seed`, epoch, i), not from a worker's random stream, so a resumed run that skips
    the batches it had already seen gets exactly the copies an uninterrupted run gets. The trainer calls
    `set_epoch`; a DataLoader over this dataset must not keep its workers across epochs (they would keep the
    epoch they were started with)."""

    def __init__(self, samples: LiberoSamples, store: FeatureStore, seed: int = 0, *, images: bool = False) -> None:
        if len(samples) != store.num_samples:
            raise ValueError(f"feature store {store.path} holds {store.num_samples} samples, the run has "
                             f"{len(samples)}")
        if images and not samples.images:
            raise ValueError("StoredFeatureSamples(images=True) needs samples that carry images")
        self.samples = samples if images else samples.without_images()
        self.images = images
        self.store = store
        self.seed = seed
        self.epoch = 0
        self.sample_sources = samples.sample_sources

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def copy_of(self, index: int) -> int:
        """Which stored copy sample `index` is read from in this epoch."""
        if self.store.copies == 1:
            return 0
        return int(np.random.default_rng([self.seed, self.epoch, index]).integers(self.store.copies))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        if any(not -len(self) <= int(index) < len(self) for index in indices):
            raise IndexError(f"sample index out of range for {len(self)} samples: {list(indices)}")
        positions = [int(index) % len(self) for index in indices]
        copies = [self.copy_of(position) for position in positions]
        if self.images:  # one sample at a time, each shifted as its copy was
            samples = [_sample_with_images(self.samples, position, copy) for position, copy in zip(positions, copies)]
        else:
            samples = self.samples.__getitems__(positions)
        for sample, position, copy in zip(samples, positions, copies):
            sample[OBS_VISION_FEATURES] = self.store.read(position, copy)
        return samples
