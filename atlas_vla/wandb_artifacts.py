"""`wandb:ENTITY/PROJECT/NAME:ALIAS`: a policy or a checkpoint that a run logged to W&B, read wherever a local
folder is.

A reference names one version of an artifact (`ALIAS` is `best`, `final`, `latest`, `step-400`, `v3`, ...).
`download` fetches it once into a cache folder named by the artifact's digest (`$ATLAS_VLA_CACHE/wandb`,
default `~/.cache/atlas-vla/wandb`), checks every file against the SHA-256 hashes the training run recorded in
the version's metadata (`files`) and only then moves it into place, so a cached folder is always a whole,
checked copy. The W&B API key comes from `wandb login` or `WANDB_API_KEY`, never from a config.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from atlas_vla.files import StagedFolder, file_hashes, write_json_atomic

logger = logging.getLogger(__name__)

PREFIX = "wandb:"
POLICY_ARTIFACT_TYPE, CHECKPOINT_ARTIFACT_TYPE = "model", "checkpoint"
FORM = "wandb:ENTITY/PROJECT/NAME:ALIAS (e.g. wandb:my-team/atlas-vla/atlas-policy-3x7k2m9q:best)"
_PART = r"[\w.\-]+"
_REFERENCE = re.compile(rf"({_PART})/({_PART})/({_PART}):({_PART})")


@dataclass(frozen=True)
class WandbReference:
    """One version of a W&B artifact."""

    entity: str
    project: str
    name: str
    alias: str

    @property
    def path(self) -> str:
        """The artifact path `wandb.Api().artifact` takes."""
        return f"{self.entity}/{self.project}/{self.name}:{self.alias}"

    def __str__(self) -> str:
        return PREFIX + self.path


def is_wandb_reference(name: str | os.PathLike | None) -> bool:
    """Whether `name` is meant as a W&B artifact (it starts with `wandb:`), well formed or not."""
    return isinstance(name, str) and name.startswith(PREFIX)


def parse_reference(text: str) -> WandbReference:
    """The reference `text` names; `ValueError` naming it and the expected form when it is malformed."""
    match = _REFERENCE.fullmatch(text[len(PREFIX):]) if is_wandb_reference(text) else None
    if match is None:
        raise ValueError(f"{text!r} is not a W&B artifact reference: expected {FORM}")
    return WandbReference(*match.groups())


def check_reference(name: str | None) -> None:
    """`ValueError` (naming the expected form) when `name` is meant as a W&B reference but is malformed: what a
    config or a command checks where it reads a name, before anything runs."""
    if is_wandb_reference(name):
        parse_reference(name)


def check_files(folder: Path, recorded: Mapping[str, str], what: str) -> None:
    """`ValueError` unless `folder` holds exactly the files `recorded` (relative path -> SHA-256) names, with those
    hashes: a download that was tampered with, truncated or mixed up is refused, naming the first difference."""
    found = file_hashes(folder)
    problems = [f"{name} is missing" for name in recorded if name not in found]
    problems += [f"{name} was not recorded" for name in found if name not in recorded]
    problems += [f"{name} has SHA-256 {found[name][:16]}..., {recorded[name][:16]}... recorded"
                 for name in recorded if name in found and found[name] != recorded[name]]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(f"{what} does not match the hashes its training run recorded: {shown}")


def cache_root() -> Path:
    return Path(os.environ.get("ATLAS_VLA_CACHE", Path.home() / ".cache" / "atlas-vla")).expanduser() / "wandb"


def download(reference: str | WandbReference, kind: str) -> Path:
    """A checked local copy of the artifact version `reference` (of W&B type `kind`: `model` or `checkpoint`),
    downloaded once. Where W&B cannot be reached (a compute node without a network), the copy this reference
    last resolved to is used, with a warning that the alias may have moved since. `FileNotFoundError` with W&B's
    reason when it cannot be had at all; `ValueError` when its files differ from the hashes recorded with it."""
    reference = parse_reference(reference) if isinstance(reference, str) else reference
    try:
        import wandb

        artifact = wandb.Api(timeout=60).artifact(reference.path, type=kind)
    except Exception as error:  # wandb raises CommError, UsageError, ValueError, ... for these
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        cached = _last_resolved(reference)
        if cached is not None:
            logger.warning("W&B cannot be reached (%s): using the copy %s last resolved to, %s (the alias may have "
                           "moved since)", reason, reference, cached)
            return cached
        raise FileNotFoundError(f"{reference} could not be had from W&B (a {kind} artifact; needs a network and "
                                f"`wandb login`): {reason}") from error
    folder = fetch_version(artifact, cache_root() / artifact.digest, f"{reference} ({artifact.name})")
    write_json_atomic(_resolution_file(reference), {"digest": artifact.digest, "files": artifact.metadata["files"]})
    return folder


def _resolution_file(reference: WandbReference) -> Path:
    """Where the cache remembers which version `reference` last named, and that version's file hashes."""
    return cache_root() / "resolved" / reference.entity / reference.project / f"{reference.name}:{reference.alias}.json"


def _last_resolved(reference: WandbReference) -> Path | None:
    """The cached copy `reference` last resolved to, if it is still there and whole (None otherwise)."""
    try:
        resolved = json.loads(_resolution_file(reference).read_text())
        folder = cache_root() / resolved["digest"]
        check_files(folder, resolved["files"], f"the cached copy of {reference}")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return folder


def fetch_version(artifact: Any, target: Path, what: str) -> Path:
    """`artifact`'s files in `target`: reused when a checked copy is already there, else downloaded beside it,
    checked against the hashes in its metadata and moved into place. Processes that fetch the same version at once
    (the ranks of a job) take turns on a lock file beside `target`: one downloads, the others find its copy."""
    from filelock import FileLock

    recorded = dict((artifact.metadata or {}).get("files") or {})
    if not recorded:
        raise ValueError(f"{what} has no file hashes in its metadata: it was not logged by atlas-vla's training")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            try:
                check_files(target, recorded, f"the cached copy of {what} in {target}")
                return target
            except ValueError as error:  # damaged since it was checked: fetched again
                logger.warning("%s; downloading it again", error)
        with StagedFolder(target) as staged:
            try:
                artifact.download(root=str(staged.path))
            except Exception as error:  # the network went away, the version was deleted, ...
                raise FileNotFoundError(f"{what} could not be downloaded from W&B: "
                                        f"{' '.join(f'{type(error).__name__}: {error}'.split())}") from error
            check_files(staged.path, recorded, what)
    return target


def attach_evaluation(run: Any, reference: WandbReference, evaluation: Mapping[str, Any],
                      digest: str | None = None) -> bool:
    """After a closed-loop evaluation of the policy version `reference`: record in the eval `run` that it used that
    version (W&B lineage) and append `evaluation` (suite, episodes, successes, success rate, 95% interval, initial
    states, seed, the eval run's id) to the version's `evaluations` metadata. `digest`, when given, is the digest of
    the version that was evaluated: an alias that has moved since (to another version) is not written to. The
    `best` alias is left to the training run's rule (`training.artifacts`). Needs W&B's servers: where they cannot
    be reached (offline, no access) it is one warning line and returns False."""
    try:
        artifact = run.use_artifact(reference.path, type=POLICY_ARTIFACT_TYPE)
        if digest is not None and artifact.digest != digest:
            raise ValueError(f"{reference} now names version {artifact.version} (digest {artifact.digest}), not the "
                             f"one evaluated (digest {digest})")
        artifact.metadata = {**artifact.metadata,
                             "evaluations": [*artifact.metadata.get("evaluations", []), dict(evaluation)]}
        artifact.save()
    except Exception as error:  # offline, no access, a version since deleted: the evaluation itself stands
        logger.warning("the evaluation was not attached to the W&B artifact %s: %s", reference,
                       " ".join(f"{type(error).__name__}: {error}".split()))
        return False
    return True
