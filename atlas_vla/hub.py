"""Local path or Hugging Face Hub id: the one rule every loader uses to tell them apart.

A name that exists on disk is local. Otherwise it is a Hub id only if it looks like one: exactly
`owner/name` (letters, digits, `_`, `.`, `-`; dots allowed, e.g. `org/atlas-v1.5`), not starting with
`.`, `/` or `~`, and not ending in a file suffix (`weights.safetensors` is a missing file, not a
repo). Anything else is a missing local path, reported as such instead of as a Hub error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".json", ".yaml", ".yml", ".parquet", ".hdf5", ".h5", ".npz")


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether `name` has the shape of a Hub repo id (`owner/name`), whatever is on disk."""
    text = str(name)
    return (not text.startswith((".", "/", "~")) and _HUB_ID.fullmatch(text) is not None
            and not text.lower().endswith(FILE_SUFFIXES))


def local_path_or_hub_id(name: str | os.PathLike, missing: str) -> Path | str:
    """An existing local `Path`, else `name` as a Hub id string; `FileNotFoundError(missing)` when it is neither."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if is_hub_id(name):
        return str(name)
    raise FileNotFoundError(missing)
