"""`wandb:ENTITY/PROJECT/NAME:ALIAS`: a policy or a checkpoint that a run logged to W&B, read wherever a local
folder is.

A reference names one version of an artifact (`ALIAS` is `best`, `final`, `latest`, `step-400`, `v3`, ...).
`download` fetches it once into a cache folder named by the artifact's digest (`$ATLAS_VLA_CACHE/wandb`,
default `~/.cache/atlas-vla/wandb`), checks every file against the SHA-256 hashes the training run recorded in
the version's metadata (`files`) and only then moves it into place, so a cached folder is always a whole,
checked copy. The W&B API key comes from `wandb login` or `WANDB_API_KEY`, never from a config.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from atlas_vla.files import StagedFolder, file_hashes

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
    downloaded once. `FileNotFoundError` with W&B's reason when it cannot be had (no network, no such version,
    no access); `ValueError` when its files differ from the hashes recorded with it."""
    reference = parse_reference(reference) if isinstance(reference, str) else reference
    try:
        import wandb

        artifact = wandb.Api(timeout=60).artifact(reference.path, type=kind)
    except Exception as error:  # wandb raises CommError, UsageError, ValueError, ... for these
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise FileNotFoundError(f"{reference} could not be had from W&B (a {kind} artifact; needs a network and "
                                f"`wandb login`): {reason}") from error
    return fetch_version(artifact, cache_root() / artifact.digest, f"{reference} ({artifact.name})")


def fetch_version(artifact: Any, target: Path, what: str) -> Path:
    """`artifact`'s files in `target`: reused when already there, else downloaded beside it, checked against the
    hashes in its metadata and moved into place."""
    recorded = dict((artifact.metadata or {}).get("files") or {})
    if not recorded:
        raise ValueError(f"{what} has no file hashes in its metadata: it was not logged by atlas-vla's training")
    if target.is_dir():
        check_files(target, recorded, f"the cached copy of {what} in {target}")
        return target
    with StagedFolder(target) as staged:
        artifact.download(root=str(staged.path))
        check_files(staged.path, recorded, what)
    return target


def attach_evaluation(run: Any, reference: WandbReference, evaluation: Mapping[str, Any]) -> bool:
    """After a closed-loop evaluation of the policy version `reference`: record in the eval `run` that it used that
    version (W&B lineage), append `evaluation` (suite, episodes, successes, success rate, 95% interval, initial
    states, seed, the eval run's id) to the version's `evaluations` metadata, and give it the alias `best` when its
    success rate on that suite is the highest any version of the artifact has recorded. Needs W&B's servers: where
    they cannot be reached (offline, no access) it is one warning line and returns False."""
    try:
        artifact = run.use_artifact(reference.path, type=POLICY_ARTIFACT_TYPE)
        artifact.metadata = {**artifact.metadata,
                             "evaluations": [*artifact.metadata.get("evaluations", []), dict(evaluation)]}
        if _is_best_evaluated(artifact, evaluation):
            artifact.aliases.append("best")
        artifact.save()
    except Exception as error:  # offline, no access, a version since deleted: the evaluation itself stands
        logger.warning("the evaluation was not attached to the W&B artifact %s: %s", reference,
                       " ".join(f"{type(error).__name__}: {error}".split()))
        return False
    return True


def _is_best_evaluated(artifact: Any, evaluation: Mapping[str, Any]) -> bool:
    """Whether `evaluation`'s success rate beats every rate another version of `artifact` recorded on its suite."""
    import wandb

    others = wandb.Api(timeout=60).artifacts(artifact.type, f"{artifact.entity}/{artifact.project}/"
                                                            f"{artifact.name.split(':')[0]}")
    rates = [recorded["success_rate"] for version in others if version.version != artifact.version
             for recorded in (version.metadata or {}).get("evaluations", [])
             if recorded.get("suite") == evaluation["suite"]]
    return all(evaluation["success_rate"] > rate for rate in rates)


def evaluation_record(suite: str, summary: Mapping[str, Any], settings: Mapping[str, Any], run_id: str
                      ) -> dict[str, Any]:
    """What `attach_evaluation` appends for an eval-libero summary: the suite's counts, rate and interval, the
    initial states and seed it ran, and the eval run."""
    evaluated = settings.get("eval") or {}
    return {"suite": suite, "episodes": summary["episodes"], "successes": summary["successes"],
            "success_rate": summary["success_rate"], "interval_95": list(summary["interval_95"]),
            "initial_states": evaluated.get("initial_states"), "seed": evaluated.get("seed"), "eval_run": run_id}
