"""Local path or Hugging Face Hub id: the one rule every loader uses to tell them apart.

A name that exists on disk is local. Otherwise it is a Hub id only if it looks like one: exactly
`owner/name` (letters, digits, `_`, `.`, `-`; dots allowed, e.g. `org/atlas-v1.5`; so never starting with
`/` or `~`), not starting with `.` (a hidden folder such as `.cache/x`), and not ending in a file suffix
(`weights.safetensors` is a missing file, not a repo). Anything else is a missing local path, reported as
such instead of as a Hub error. A W&B artifact reference (`wandb:...`) is neither and stays as it is.

`resolve_local` applies the same rule once, where a name is read: a local path is fixed against the working
directory of the command that named it, so that it means the same wherever it is read again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from atlas_vla.wandb_artifacts import is_wandb_reference

_HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".json", ".yaml", ".yml", ".parquet", ".hdf5", ".h5", ".npz")


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether `name` has the shape of a Hub repo id (`owner/name`), whatever is on disk."""
    text = str(name)
    return (not text.startswith(".") and _HUB_ID.fullmatch(text) is not None
            and not text.lower().endswith(FILE_SUFFIXES))


def is_hub_repo(name: str | os.PathLike) -> bool:
    """Whether `name` means a Hub repo: shaped like one and not a path on disk."""
    return is_hub_id(name) and not Path(name).expanduser().exists()


def is_local(name: str | os.PathLike) -> bool:
    """Whether `name` is a local path: neither a Hub repo (`is_hub_repo`) nor a W&B reference."""
    return not (is_wandb_reference(str(name)) or is_hub_repo(name))


def public_name(name: str | os.PathLike) -> str:
    """What may leave this machine of a source's or a model's name (a pushed policy, a model card): a Hub id or a
    W&B reference as it is, a local path by its last part only (the rest names the user's machine)."""
    return Path(name).name if is_local(name) else str(name)


def absolute_path(path: str | os.PathLike) -> str:
    """A local path fixed against the working directory (`~` expanded, symbolic links kept)."""
    return str(Path(path).expanduser().absolute())


def resolve_local(name: str) -> str:
    """`name` with a local path made absolute (`absolute_path`): an existing path, or a name that cannot be a Hub
    id; a Hub id that is not on disk, and a W&B artifact reference (`wandb:...`), are returned as they are."""
    return absolute_path(name) if is_local(name) else name


def hub_failure(error: BaseException) -> str:
    """Why a Hub download failed, on one line (not found, offline and not cached, a bad revision, ...)."""
    return f"{type(error).__name__}: {error}".replace("\n", " ")


def local_path_or_hub_id(name: str | os.PathLike, missing: str) -> Path | str:
    """An existing local `Path`, else `name` as a Hub id string; `FileNotFoundError(missing)` when it is neither."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if is_hub_id(name):
        return str(name)
    raise FileNotFoundError(missing)
