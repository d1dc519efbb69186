"""Writing files and folders so that a reader never sees half of one.

Every file atlas-vla writes (JSON results, statistics, configs, videos) and every folder it
assembles (a saved policy, a converted dataset, a checkpoint) is written under a temporary name
beside its target, flushed to disk, and only then renamed into place. A crash, a kill or a full
disk leaves the previous version (or nothing), never a truncated file or a folder that looks complete.
`file_hash` / `file_hashes` are the content hashes a copy is checked with; `read_json` reads one back, naming
the file when it is not JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _apply_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes the user's umask asks for. Some writers create files
    0600 whatever the umask (safetensors does), which would hide a policy from an evaluation job run by
    another user."""
    mask = _current_umask()
    for path in (folder, *folder.rglob("*")):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        _fsync(path)
    _fsync(folder)


@contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix) to write; on success it replaces `path`.

    On an error the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with staged_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in `path`; `ValueError` naming the file when it is not valid JSON (empty, cut short)."""
    try:
        with open(path) as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def write_json_atomic(path: str | os.PathLike, value: Any) -> Path:
    """Write `value` as indented JSON to `path` atomically."""
    return write_text_atomic(path, json.dumps(value, indent=2))


def swap_in_folder(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished folder `new` to `target`, replacing any folder there, never leaving a
    half-written `target`: its modes follow the umask, its files are flushed first, and an old `target`
    is moved aside before the rename and deleted after it."""
    new, target = Path(new), Path(target)
    _apply_umask(new)
    _fsync_tree(new)
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
        try:
            new.rename(target)
        except BaseException:
            old.rename(target)  # put the previous version back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)
    _fsync(target.parent)
    return target


class StagedFolder:
    """A folder assembled at `.path`, beside `target`, and moved to `target` by `commit()`.

    As a context manager it commits when the block succeeds and removes the temporary folder when it
    raises. `abort()` removes it explicitly (for writers whose lifetime spans several calls).
    """

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.target.parent / f".{self.target.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()

    def commit(self) -> Path:
        return swap_in_folder(self.path, self.target)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "StagedFolder":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def file_hash(path: Path) -> str:
    """SHA-256 (hex) of one file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """`file_hash` of every file in `folder` by relative POSIX path (what a W&B policy version records and is
    checked with)."""
    return {path.relative_to(folder).as_posix(): file_hash(path)
            for path in sorted(p for p in folder.rglob("*") if p.is_file())}
