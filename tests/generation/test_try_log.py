"""The try log of a generation: one writer at a time; it resumes only a run with the same settings."""

from __future__ import annotations

import pytest

from atlas_vla.generation.generate import Settings, TryLog


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
