"""The log of finished episodes that lets a killed evaluation continue where it stopped.

`eval-libero --output RESULTS.json` appends every finished episode, as one JSON line flushed to disk, to
`RESULTS.episodes.jsonl` beside it. Its first line is the evaluation's identity: the policy (the SHA-256 of
its files, or the server it was asked through) and every setting that decides what an episode does (suite,
tasks, initial states, steps, chunk schedule, camera size, seed; not the number of workers or the video
folder). A rerun with the same identity skips the episodes the log holds and runs the rest; a log of another
evaluation is refused, naming what differs, rather than mixed in (`--fresh` discards it). Episodes that ended in an error (a worker
that died, a timeout) are run again. A line cut short by a kill is dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Mapping

from atlas_vla.eval.libero_sim import EpisodeResult, EpisodeSpec

LOG_SCHEMA = "atlas-vla/episode-log/v1"
IGNORED_SETTINGS = ("num_workers", "videos", "every_steps")  # they change how episodes run, not what they do


def log_path(results_path: str | os.PathLike) -> Path:
    """`RESULTS.episodes.jsonl` beside the results file `RESULTS.json`."""
    path = Path(results_path)
    return path.with_name(f"{path.stem}.episodes.jsonl")


def identity(policy: str, eval_settings: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two evaluations the same: `policy` (a file hash or a server) and the settings that decide
    what an episode does."""
    return {"schema": LOG_SCHEMA, "policy": policy,
            "eval": {key: value for key, value in sorted(eval_settings.items()) if key not in IGNORED_SETTINGS}}


def episode_key(item: EpisodeSpec | EpisodeResult) -> tuple[str, int, int]:
    return item.suite, item.task_id, item.initial_state


class EpisodeLog:
    """The finished episodes of one evaluation, read at start and appended to as each episode ends."""

    def __init__(self, path: str | os.PathLike, evaluation: Mapping[str, Any]) -> None:
        """Open (or start) the log at `path` for the evaluation `evaluation` (`identity`); `ValueError` naming the
        differing settings when the log belongs to another evaluation."""
        self.path = Path(path)
        self.finished: dict[tuple[str, int, int], EpisodeResult] = {}
        evaluation = json.loads(json.dumps(dict(evaluation)))  # compared as the log holds it
        lines = self._complete_lines()
        if not lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write_line(evaluation, mode="w")
            return
        recorded = json.loads(lines[0])
        if recorded != evaluation:
            raise ValueError(f"{self.path} logs another evaluation ({_differences(recorded, evaluation)}): rerun "
                             f"with its settings to continue it, pass --fresh to start over, or choose another --output")
        for line in lines[1:]:
            result = EpisodeResult(**json.loads(line))
            if result.error is None:
                self.finished[episode_key(result)] = result

    def remaining(self, specs: Iterable[EpisodeSpec]) -> list[EpisodeSpec]:
        """The episodes of `specs` the log does not hold."""
        return [spec for spec in specs if episode_key(spec) not in self.finished]

    def append(self, result: EpisodeResult) -> None:
        """Record one finished episode on disk before anything else happens."""
        self._write_line(asdict(result), mode="a")
        if result.error is None:
            self.finished[episode_key(result)] = result

    def _complete_lines(self) -> list[str]:
        """The log's lines, after cutting a last line a kill left unfinished."""
        if not self.path.is_file():
            return []
        text = self.path.read_text()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
            with self.path.open("r+") as handle:
                handle.truncate(len(text.encode()))
        return text.splitlines()

    def _write_line(self, value: Mapping[str, Any], mode: str) -> None:
        with self.path.open(mode) as handle:
            handle.write(json.dumps(value) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    """`eval.seed: 0 logged, 3 now; ...` for the keys whose values differ."""
    flat_recorded, flat_wanted = _flatten(recorded), _flatten(wanted)
    keys = sorted(set(flat_recorded) | set(flat_wanted))
    return "; ".join(f"{key}: {flat_recorded.get(key)!r} logged, {flat_wanted.get(key)!r} now"
                     for key in keys if flat_recorded.get(key) != flat_wanted.get(key))


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
