"""NormStats: per-dimension statistics of actions and states, computed once, stored with the policy, checked.

Normalisation is a unit change, so it comes as a pair: `normalize` on the way in, `unnormalize` on
the way out, both from the same `FeatureStats`. The action gripper dimension is already a binary
-1/+1 command and passes through both untouched. Statistics carry a fingerprint of the frames they
were computed on, so a policy refuses statistics that came from other data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import datasets
import numpy as np
import torch

from atlas_vla.action_layout import ACTION_DIM, known_actions
from atlas_vla.constants import ACTION, EPISODE_INDEX, OBJECT_POSITIONS, SOURCE_INDEX, STATE, STATE_DIM
from atlas_vla.files import write_json_atomic
from atlas_vla.hub import public_name

NormalizationMode = Literal["mean_std", "quantile", "none"]
NORMALIZATION_MODES = ("mean_std", "quantile", "none")
_EPS = 1e-6
_FIELDS = ("mean", "std", "min", "max", "q01", "q99")


@dataclass
class FeatureStats:
    """Per-dimension statistics of one feature (arrays of shape (dim,))."""

    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    q01: np.ndarray
    q99: np.ndarray

    @classmethod
    def compute(cls, values: np.ndarray) -> "FeatureStats":
        """Statistics over the rows of `values` (frames, dim), in float64."""
        values = np.asarray(values, dtype=np.float64)
        q01, q99 = np.quantile(values, [0.01, 0.99], axis=0)
        return cls(values.mean(0), values.std(0), values.min(0), values.max(0), q01, q99)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def to_dict(self) -> dict[str, list[float]]:
        return {name: getattr(self, name).tolist() for name in _FIELDS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "stats") -> "FeatureStats":
        missing = [name for name in _FIELDS if name not in values]
        if missing:
            raise ValueError(f"{where}: missing statistics {missing}; expected {list(_FIELDS)}")
        arrays = {name: np.asarray(values[name], dtype=np.float64) for name in _FIELDS}
        dims = {name: a.shape for name, a in arrays.items()}
        if len(set(dims.values())) != 1 or arrays["mean"].ndim != 1:
            raise ValueError(f"{where}: statistics must be 1-D arrays of one length, got shapes {dims}")
        return cls(**arrays)


@dataclass
class NormStats:
    """Action and state statistics of a training split, with the fingerprint of that split."""

    action: FeatureStats
    state: FeatureStats
    num_frames: int
    fingerprint: str
    # with several data sources: per source (in data.source order) its public name, frames and fingerprint
    sources: list[dict[str, Any]] = field(default_factory=list)

    def per_source(self, name: str | None = None) -> list[dict[str, Any]]:
        """Each source's `source`, `num_frames` and `fingerprint`; statistics of one source (which record no
        `sources`) give one row named `name`."""
        if self.sources:
            return [dict(source) for source in self.sources]
        return [{"source": name, "num_frames": self.num_frames, "fingerprint": self.fingerprint}]

    def to_dict(self) -> dict[str, Any]:
        values = {"fingerprint": self.fingerprint, "num_frames": self.num_frames,
                  "action": self.action.to_dict(), "state": self.state.to_dict()}
        return {**values, "sources": self.sources} if self.sources else values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "stats") -> "NormStats":
        missing = [k for k in ("fingerprint", "num_frames", "action", "state") if k not in values]
        if missing:
            raise ValueError(f"{where}: missing keys {missing}; expected fingerprint, num_frames, action, state")
        stats = cls(FeatureStats.from_dict(values["action"], f"{where}: action"),
                    FeatureStats.from_dict(values["state"], f"{where}: state"),
                    int(values["num_frames"]), str(values["fingerprint"]), list(values.get("sources", [])))
        if stats.action.dim != ACTION_DIM or stats.state.dim != STATE_DIM:
            raise ValueError(f"{where}: expected {ACTION_DIM}-D action and {STATE_DIM}-D state statistics, "
                             f"got {stats.action.dim}-D and {stats.state.dim}-D")
        return stats

    def content_hash(self) -> str:
        """A hash of the statistics themselves (every value, the frame count and the data fingerprint), so a
        stored copy can be checked against the numbers it holds, not against a fingerprint it also holds."""
        digest = hashlib.sha256(f"{self.num_frames}:{self.fingerprint}".encode())
        for feature in (self.action, self.state):
            for name in _FIELDS:
                digest.update(np.ascontiguousarray(getattr(feature, name), dtype=np.float64).tobytes())
        return digest.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temporary file, then rename)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NormStats":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"normalisation statistics not found: {path}")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        return cls.from_dict(values, where=str(path))

    def check_matches(self, other: "NormStats", what: str = "statistics") -> None:
        """Raise `ValueError` naming the difference when `other` is not the same statistics."""
        if self.fingerprint != other.fingerprint:
            raise ValueError(f"{what} come from other data: fingerprint {other.fingerprint} (frames "
                             f"{other.num_frames}) vs {self.fingerprint} (frames {self.num_frames}) expected")
        for feature in ("action", "state"):
            mine, theirs = getattr(self, feature), getattr(other, feature)
            for name in _FIELDS:
                if not np.allclose(getattr(mine, name), getattr(theirs, name), rtol=1e-6, atol=1e-8):
                    raise ValueError(f"{what}: {feature}.{name} differs from the expected values")


def data_fingerprint(actions: np.ndarray, states: np.ndarray, episodes: np.ndarray) -> str:
    """Content hash of the frames statistics are computed on (16 hex chars)."""
    digest = hashlib.sha256()
    for array in (actions, states, episodes):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def compute_norm_stats(dataset: datasets.Dataset, source_names: Sequence[str] | None = None) -> NormStats:
    """Statistics of the action and state columns of `dataset` (canonical columns), vectorised; the actions' over
    the frames that have one (`action_layout.known_actions`: a rendered scene has none).

    Only the numeric columns are read from Arrow (images are never decoded). The fingerprint is a
    hash of exactly those frames, so the same split gives the same fingerprint on any machine. A
    table joined from several sources (with `SOURCE_INDEX`) gets statistics over the union and, per
    source, the fingerprint of its frames (named by `source_names`, in `data.source` order: a local folder by its
    name only, as the statistics travel with a pushed policy).
    """
    for column in (ACTION, STATE, EPISODE_INDEX):
        if column not in dataset.column_names:
            raise ValueError(f"cannot compute statistics: column {column!r} missing; found {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("cannot compute statistics of an empty dataset")
    joined = SOURCE_INDEX in dataset.column_names
    located = OBJECT_POSITIONS in dataset.column_names
    table = dataset.select_columns([ACTION, STATE, EPISODE_INDEX, *([SOURCE_INDEX] if joined else []),
                                    *([OBJECT_POSITIONS] if located else [])]).with_format("numpy")[:]
    actions = np.asarray(table[ACTION], dtype=np.float32)
    states = np.asarray(table[STATE], dtype=np.float32)
    episodes = np.asarray(table[EPISODE_INDEX])
    if actions.shape[1:] != (ACTION_DIM,) or states.shape[1:] != (STATE_DIM,):
        raise ValueError(f"expected actions (N, {ACTION_DIM}) and states (N, {STATE_DIM}), "
                         f"got {actions.shape} and {states.shape}")

    def where(row: int) -> str:
        return f"at row {row} (episode {int(episodes[row])})"

    known = known_actions(actions, np.asarray(table[OBJECT_POSITIONS], np.float32) if located else None, where)
    if not known.any():
        raise ValueError("cannot compute action statistics: no frame has an action (only rendered scenes?); train "
                         "them with demonstrations")
    if not np.isfinite(states).all():
        row = int(np.argwhere(~np.isfinite(states))[0, 0])
        raise ValueError(f"column {STATE!r} holds a non-finite value {where(row)}")
    sources = []
    if joined:
        origin = np.asarray(table[SOURCE_INDEX])
        for index in np.unique(origin).tolist():
            rows = origin == index
            name = public_name(source_names[index]) if source_names is not None else str(index)
            sources.append({"source": name, "num_frames": int(rows.sum()),
                            "fingerprint": data_fingerprint(actions[rows], states[rows], episodes[rows])})
    return NormStats(FeatureStats.compute(actions[known]), FeatureStats.compute(states), int(len(actions)),
                     data_fingerprint(actions, states, episodes), sources)


def _as_tensors(stats: FeatureStats, like: torch.Tensor, names: Sequence[str]) -> list[torch.Tensor]:
    return [torch.as_tensor(getattr(stats, n), dtype=like.dtype, device=like.device) for n in names]


def _keep_mask(dim: int, keep: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(dim, dtype=torch.bool, device=like.device)
    mask[list(keep)] = True
    return mask


def normalize(x: torch.Tensor, stats: FeatureStats, mode: NormalizationMode,
              keep: Sequence[int] = ()) -> torch.Tensor:
    """Map raw values to normalised units; dimensions in `keep` pass through untouched.

    `mean_std`: (x - mean) / std. `quantile`: q01..q99 -> -1..1, clipped to [-1, 1]. `none`: identity.
    """
    if mode == "none":
        return x
    if mode == "mean_std":
        mean, std = _as_tensors(stats, x, ("mean", "std"))
        out = (x - mean) / std.clamp_min(_EPS)
    elif mode == "quantile":
        low, high = _as_tensors(stats, x, ("q01", "q99"))
        out = (2 * (x - low) / (high - low).clamp_min(_EPS) - 1).clamp(-1, 1)
    else:
        raise ValueError(f"normalisation mode must be one of {NORMALIZATION_MODES}, got {mode!r}")
    return torch.where(_keep_mask(stats.dim, keep, x), x, out) if keep else out


def unnormalize(x: torch.Tensor, stats: FeatureStats, mode: NormalizationMode,
                keep: Sequence[int] = ()) -> torch.Tensor:
    """Inverse of `normalize` (exact for `mean_std`; for `quantile` within [q01, q99])."""
    if mode == "none":
        return x
    if mode == "mean_std":
        mean, std = _as_tensors(stats, x, ("mean", "std"))
        out = x * std.clamp_min(_EPS) + mean
    elif mode == "quantile":
        low, high = _as_tensors(stats, x, ("q01", "q99"))
        out = (x + 1) / 2 * (high - low).clamp_min(_EPS) + low
    else:
        raise ValueError(f"normalisation mode must be one of {NORMALIZATION_MODES}, got {mode!r}")
    return torch.where(_keep_mask(stats.dim, keep, x), x, out) if keep else out
