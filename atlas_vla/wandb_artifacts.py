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


def check_reference(name: str | None, key: str | None = None) -> None:
    """`ValueError` (naming `key`, the setting or flag, and the expected form) when `name` is meant as a W&B
    reference but is malformed: what a config or a command checks where it reads a name, before anything runs."""
    if is_wandb_reference(name):
        try:
            parse_reference(name)
        except ValueError as error:
            raise ValueError(f"{key}: {error}" if key else str(error)) from None


def check_files(folder: Path, recorded: Mapping[str, str], what: str) -> None:
    """`ValueError` unless `folder` holds exactly the files `recorded` (relative path -> SHA-256) names, with those
    hashes: a download that was tampered with, truncated or mixed up is refused, naming up to three differences."""
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
    downloaded once. Where W&B cannot be reached (a compute node without a network or a login), the copy this
    reference last resolved to is used, with a warning that the alias may have moved since; where W&B answers that
    the version does not exist (deleted, a typo), no cached copy stands in for it. `FileNotFoundError` with W&B's
    reason when it cannot be had at all; `ValueError` when its files differ from the hashes recorded with it."""
    reference = parse_reference(reference) if isinstance(reference, str) else reference
    import wandb
    from wandb.errors import CommError, UsageError

    try:
        artifact = wandb.Api(timeout=60).artifact(reference.path, type=kind)
    except Exception as error:  # wandb raises CommError, UsageError, ValueError, ... for these
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        # no login, no connection (CommError), a timeout: W&B was not asked; ValueError: it answered (no such version)
        cached = _last_resolved(reference) if isinstance(error, (CommError, UsageError, OSError)) else None
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


def success_rate_suite(metric: str, suite: str) -> str | None:
    """The suite whose closed-loop success rate `metric` is (`eval/success_rate`: `suite`, the run's `eval.suite`;
    `eval/<name>/success_rate`: that suite), None for any other metric (validation errors, failure counts, one
    task's rate): only a suite's rate is measured again, by the same rule, when a version is evaluated later."""
    if metric == "eval/success_rate":
        return suite
    parts = metric.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "eval" and parts[2] == "success_rate" else None


def _comparable(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two results rate the same episodes: same suite, initial states and number of episodes."""
    return all(a.get(key) == b.get(key) for key in ("suite", "initial_states", "episodes"))


def best_moves(metadata: Mapping[str, Any], evaluation: Mapping[str, Any], best: Mapping[str, Any] | None
               ) -> tuple[bool, str]:
    """Whether `evaluation`, attached to a version with `metadata`, moves the `best` alias to it, and why (one
    line). `best` is the metadata of the version that holds the alias now (None: no version does). It moves only
    where the run's `best` follows this suite's success rate (`metric`, `metric_suite`), and the evaluated rate
    beats the latest result of the same episodes (suite, initial states, count) in the `evaluations` of the
    version holding `best` (the training run's own, then attached ones); a `best` chosen on other episodes stays
    (rates of different episodes are not compared), and a tie keeps it."""
    metric = str(metadata.get("metric"))
    suite = success_rate_suite(metric, str(metadata.get("metric_suite")))
    if suite != evaluation.get("suite"):
        return False, (f"best follows {metric}" + (f" on {suite}" if suite else "") +
                       f", not the success rate on {evaluation.get('suite')}")
    rate = float(evaluation["success_rate"])
    if best is None:
        return True, f"no version was best yet; this one succeeded {rate:.3f} on {suite}"
    if best.get("files") == metadata.get("files"):  # the same files are the same version (W&B's digest)
        return False, "this version is already best"
    same = [record for record in best.get("evaluations", []) if _comparable(record, evaluation)]
    if not same:
        return False, (f"the best version (step {best.get('step')}) was not evaluated on the same episodes "
                       f"({suite}, initial states {evaluation.get('initial_states')}, {evaluation.get('episodes')} "
                       f"episodes), so the rates are not compared")
    held = float(same[-1]["success_rate"])
    if rate > held:
        return True, f"{rate:.3f} beats {held:.3f} of the best version (step {best.get('step')}) on {suite}"
    return False, f"{rate:.3f} does not beat {held:.3f} of the best version (step {best.get('step')}) on {suite}"


def attach_evaluation(run: Any, reference: WandbReference, evaluation: Mapping[str, Any],
                      digest: str | None = None) -> bool:
    """After a closed-loop evaluation of the policy version `reference`: record in the eval `run` that it used that
    version (W&B lineage), append `evaluation` (suite, episodes, successes, success rate, 95% interval, initial
    states, seed, the eval run's id) to the version's `evaluations` metadata, and move the `best` alias to it
    where `best_moves` says so (one info line either way). `digest`, when given, is the digest of the version that
    was evaluated: an alias that has moved since (to another version) is not written to. Needs W&B's servers:
    where they cannot be reached (offline, no access) it is one warning line and returns False."""
    try:
        artifact = run.use_artifact(reference.path, type=POLICY_ARTIFACT_TYPE)
        if digest is not None and artifact.digest != digest:
            raise ValueError(f"{reference} now names version {artifact.version} (digest {artifact.digest}), not the "
                             f"one evaluated (digest {digest})")
        metadata = {**artifact.metadata, "evaluations": [*artifact.metadata.get("evaluations", []), dict(evaluation)]}
        moves, why = best_moves(metadata, evaluation, _best_metadata(reference))
        artifact.metadata = metadata
        if moves:
            artifact.aliases = [*artifact.aliases, "best"]  # W&B moves an alias: one version of a name holds it
        artifact.save()
    except Exception as error:  # offline, no access, a version since deleted: the evaluation itself stands
        logger.warning("the evaluation was not attached to the W&B artifact %s: %s", reference,
                       " ".join(f"{type(error).__name__}: {error}".split()))
        return False
    logger.info("evaluation attached to %s; best %s: %s", reference, "moves to it" if moves else "stays", why)
    return True


def _best_metadata(reference: WandbReference) -> Mapping[str, Any] | None:
    """The metadata of the version of `reference`'s artifact that holds `best` now (None when none does)."""
    import wandb

    try:
        return wandb.Api().artifact(f"{reference.entity}/{reference.project}/{reference.name}:best",
                                    type=POLICY_ARTIFACT_TYPE).metadata
    except ValueError as error:  # W&B's answer when no version of the name has the alias
        if "not found" not in str(error):
            raise
        return None
