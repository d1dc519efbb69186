"""The try log of a generation: one writer at a time; it resumes only a run with the same settings."""

from __future__ import annotations

import pytest

from atlas_vla.generation.generate import Settings, TryLog
from atlas_vla.generation.retarget import RETARGET_VERSION


def test_one_generation_at_a_time_writes_a_folder_and_a_closed_log_lets_the_next_continue(tmp_path):
    settings = Settings(["demos"], 0, True)
    first = TryLog(tmp_path / "work", settings, fresh=False)
    first.append({"task": "libero_spatial/0", "try": 0, "kept": False})
    with pytest.raises(ValueError, match="another generate-demos is writing .*work"):
        TryLog(tmp_path / "work", settings, fresh=False)
    first.close()
    again = TryLog(tmp_path / "work", settings, fresh=False)
    assert again.records == [{"task": "libero_spatial/0", "try": 0, "kept": False}]
    again.close()
    with pytest.raises(ValueError, match=r"other settings \(seed\)"):
        TryLog(tmp_path / "work", Settings(["demos"], 1, True), fresh=False)
    TryLog(tmp_path / "work", settings, fresh=False).close()  # the refused one let go of the folder


def test_a_source_spelled_another_way_continues_the_log_in_the_new_spelling(tmp_path, monkeypatch):
    (tmp_path / "shared" / "demos").mkdir(parents=True)
    (tmp_path / "main").mkdir()
    monkeypatch.chdir(tmp_path / "main")
    first = TryLog(tmp_path / "work", Settings(["../shared/demos"], 0, True), fresh=False)
    first.append({"task": "libero_spatial/0", "try": 0, "source": "../shared/demos", "source_episode": 3})
    first.close()
    absolute = str(tmp_path / "shared" / "demos")
    again = TryLog(tmp_path / "work", Settings([absolute], 0, True), fresh=False)
    assert again.records == [{"task": "libero_spatial/0", "try": 0, "source": absolute, "source_episode": 3}]
    again.close()
    with pytest.raises(ValueError, match=r"other settings \(sources\)"):
        TryLog(tmp_path / "work", Settings([str(tmp_path / "main")], 0, True), fresh=False)
    with pytest.raises(ValueError, match=r"other settings \(other_goals, sources\)"):
        TryLog(tmp_path / "work", Settings([absolute, absolute], 0, False), fresh=False)


def test_the_tries_of_an_earlier_controller_are_not_continued(tmp_path):
    import json

    work = tmp_path / "work"
    work.mkdir()
    # a log of the first controller, whose settings named no controller
    (work / "tries.jsonl").write_text(json.dumps({"settings": {"sources": ["demos"], "seed": 0, "other_goals": True}})
                                      + "\n" + json.dumps({"task": "libero_spatial/0", "try": 0, "kept": True}) + "\n")
    version = rf"controller \(version 1, this one is {RETARGET_VERSION}\)"
    with pytest.raises(ValueError, match=rf"another re-targeting {version}: .*--fresh"):
        TryLog(work, Settings(["demos"], 0, True), fresh=False)
    with pytest.raises(ValueError, match=rf"{version} and other settings \(seed\)"):
        TryLog(work, Settings(["demos"], 3, True), fresh=False)
    fresh = TryLog(work, Settings(["demos"], 0, True), fresh=True)
    assert fresh.records == []
    fresh.close()
    assert json.loads((work / "tries.jsonl").read_text().splitlines()[0])["settings"]["controller"] == RETARGET_VERSION
