"""Read an offline W&B run file back through wandb's own protobuf records (no mocks of wandb).

An offline run writes `wandb/offline-run-*/run-<id>.wandb`: a 7-byte header, then 32 KiB blocks in
the LevelDB log format (each chunk: crc32c (4), length (2, little endian), type (1), payload; a
record may span blocks as FIRST/MIDDLE/LAST chunks). Each assembled payload is one
`wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_HEADER = 7
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    records, pending, pos = [], b"", _HEADER
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        if kind == _FULL:
            pending = payload
        elif kind == _FIRST:
            pending = payload
            continue
        elif kind == _MIDDLE:
            pending += payload
            continue
        elif kind == _LAST:
            pending += payload
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


@dataclass
class LoggedArtifact:
    """One `log_artifact` call as the run recorded it (W&B adds `latest` to the aliases it was given)."""

    name: str
    type: str
    aliases: list[str]
    metadata: dict
    digest: str  # of the manifest: equal for equal contents
    files: dict[str, tuple[str, int]]  # path in the artifact -> (base64 MD5, size)
    staged: dict[str, str]  # path in the artifact -> the staged copy `wandb sync` uploads


@dataclass
class OfflineRun:
    run_id: str = ""
    project: str = ""
    tags: list[str] = field(default_factory=list)
    notes: str = ""
    config: dict = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]
    files: list[str] = field(default_factory=list)
    preempting: bool = False  # the run was marked as being preempted
    exit_code: int | None = None  # None: the run never finished (a crash or a kill)
    artifacts: list[LoggedArtifact] = field(default_factory=list)  # in the order they were logged


def read_run(path: Path) -> OfflineRun:
    """Run id, tags, notes, config and the scalar history of an offline run file."""
    run = OfflineRun()
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project = record.run.run_id, record.run.project
            run.tags, run.notes = list(record.run.tags), record.run.notes
            for item in record.run.config.update:
                run.config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            values = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            step = int(record.history.step.num) if record.history.HasField("step") else int(json.loads(values.get("_step", "0")))
            for key, value in values.items():
                try:
                    number = json.loads(value)
                except json.JSONDecodeError:
                    continue
                if isinstance(number, (int, float)) and not key.startswith("_"):
                    run.history.setdefault(key, []).append((step, float(number)))
        elif kind == "files":
            run.files.extend(f.path for f in record.files.files)
        elif kind == "preempting":
            run.preempting = True
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
        elif kind == "artifact":
            artifact = record.artifact
            run.artifacts.append(LoggedArtifact(
                artifact.name, artifact.type, sorted(artifact.aliases), json.loads(artifact.metadata or "{}"),
                artifact.digest, {entry.path: (entry.digest, entry.size) for entry in artifact.manifest.contents},
                {entry.path: entry.local_path for entry in artifact.manifest.contents}))
    return run


def find_run_files(root: Path) -> list[Path]:
    """Every offline run file under `root` (e.g. an output_dir)."""
    return sorted(Path(root).rglob("offline-run-*/run-*.wandb"))
