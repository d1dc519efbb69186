"""Atomic files and folders: a failed write leaves the previous version, a finished one replaces it."""

from __future__ import annotations

import json
import os
import stat

import pytest

from atlas_vla.files import StagedFolder, staged_file, write_json_atomic, write_text_atomic


def test_atomic_file_replaces_on_success_and_keeps_the_old_on_error(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError):
        with staged_file(path) as tmp:
            tmp.write_text('{"a": ')  # half-written
            raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"a": 1}
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temporary file left behind


def test_staged_folder_swaps_in_complete_folders_only(tmp_path):
    target = tmp_path / "policy"
    with StagedFolder(target) as staged:
        (staged.path / "a.txt").write_text("1")
        assert not target.exists()  # invisible until complete
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(ValueError):
        with StagedFolder(target) as staged:
            (staged.path / "a.txt").write_text("2")
            raise ValueError("crash while writing")
    assert (target / "a.txt").read_text() == "1"
    with StagedFolder(target) as staged:
        (staged.path / "b.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_committed_folders_follow_the_umask_whatever_their_writers_chose(tmp_path, umask, file_mode, folder_mode):
    previous = os.umask(umask)
    try:
        with StagedFolder(tmp_path / "policy") as staged:
            os.close(os.open(staged.path / "model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))  # like safetensors
            (staged.path / "sub").mkdir(mode=0o700)
            (staged.path / "sub" / "config.json").write_text("{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "policy" / "model.safetensors").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "policy" / "sub" / "config.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "policy").stat().st_mode) == folder_mode
    assert stat.S_IMODE((tmp_path / "policy" / "sub").stat().st_mode) == folder_mode
