"""The W&B artifacts of a training run: the policy (type `model`) and, opt-in, the training state (`checkpoint`).

A run has one policy artifact, `atlas-policy-<run id>`, whose versions are checkpoints: each holds the policy
folder exactly as `from_pretrained` reads it (`config.json`, `model.safetensors` with the trainable weights,
`norm_stats.json`) and the run's `config.yaml`, so a version loads on its own. `wandb.log_model` picks them:
`final` (the default: one version per run, 9.9 MB to 112 MB, however long the run and however full the quota),
`best` (a version whenever `wandb.best_metric` beats every earlier checkpoint), `all` (every checkpoint) or
`none`. Aliases: `latest` (W&B's own), `step-<N>`, `final` on the last update's and `best` on the best so far.
Each version's metadata says what it is (`policy_metadata`).

`wandb.log_checkpoints: true` also logs each checkpoint folder whole (optimizer, schedule, RNG states) as
`atlas-checkpoint-<run id>` (alias `latest`), which `--resume_from_checkpoint wandb:...` continues from.

Only the main process logs. Logging copies the files into W&B's staging folder (`WANDB_DATA_DIR`, default
`~/.local/share/wandb`) and returns; the W&B service uploads them (an offline run records them for
`wandb sync`, which reads that staging folder). The local checkpoint is never needed afterwards, so checkpoint
retention is free to delete it. A version that cannot be staged (disk full, an unwritable staging folder) is
one warning line, and training goes on.
"""

from __future__ import annotations

import logging
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from atlas_vla.config import TrainConfig, WandbConfig
from atlas_vla.data.normalization import NormStats
from atlas_vla.files import file_hash, file_hashes
from atlas_vla.hub import public_name
from atlas_vla.wandb_artifacts import CHECKPOINT_ARTIFACT_TYPE, POLICY_ARTIFACT_TYPE

logger = logging.getLogger("atlas_vla.train")

TRAINING_CONFIG = "config.yaml"  # beside the policy files: the config the policy was trained with
SUCCESS_METRIC, VALIDATION_METRIC = "eval/success_rate", "val/pose_l1_error"


def policy_artifact_name(run_id: str) -> str:
    return f"atlas-policy-{run_id}"


def checkpoint_artifact_name(run_id: str) -> str:
    return f"atlas-checkpoint-{run_id}"


def best_metric(config: TrainConfig) -> str:
    """The metric `best` follows: `wandb.best_metric`, else the success rate when the simulator evaluates the
    policy during training, else the validation pose error."""
    if config.wandb.best_metric:
        return config.wandb.best_metric
    return SUCCESS_METRIC if config.eval.every_steps else VALIDATION_METRIC


def higher_is_better(metric: str) -> bool:
    """Success rates (`eval/success_rate`, `eval/<suite>/...`) grow as the policy improves; validation losses and
    errors, and failure counts (`eval/failures/...`), shrink."""
    return metric.startswith("eval/") and not metric.startswith("eval/failures/")


def git_commit() -> dict[str, Any] | None:
    """The commit of the atlas-vla checkout this code runs from and whether it has uncommitted changes (None when
    atlas-vla is not run from its own git checkout, e.g. installed into a virtual environment inside another
    repository)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    toplevel = git("rev-parse", "--show-toplevel")
    if toplevel is None or Path(toplevel).resolve() != root:
        return None
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


@dataclass
class ArtifactLog:
    """Decides, at each checkpoint of the main process, which artifacts to log and with which aliases."""

    wandb: WandbConfig
    run_id: str
    metric: str  # the metric `best` follows (`best_metric`)
    base_metadata: dict[str, Any]  # what every version shares: data, backbones, version, commit
    best: float | None = None  # the best value of `metric` at a checkpoint so far (kept in every checkpoint)
    suite: str | None = None  # the suite `eval/success_rate` is measured on (`eval.suite`)

    def consider(self, metrics: Mapping[str, Any]) -> bool:
        """Whether the checkpoint about to be saved is the best so far by `metric` (its latest value in
        `metrics`, measured at or before the checkpoint); if so it becomes `best`. A run whose metric was never
        logged has no best."""
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        if self.best is not None and not (value > self.best if higher_is_better(self.metric) else value < self.best):
            return False
        self.best = float(value)
        return True

    def after_checkpoint(self, tracker: Any, checkpoint: Path, step: int, *, final: bool, is_best: bool,
                         metrics: Mapping[str, Any], measured: Mapping[str, int],
                         evaluation: Sequence[Mapping[str, Any]] | None) -> list[str] | None:
        """Log what `wandb.log_model` and `log_checkpoints` ask for of `checkpoint` (the folder saved at `step`,
        the last update when `final`; the best so far when `is_best`); `metrics` are the latest logged values and
        `measured` the step each was logged at. Returns the aliases of the policy version logged (None when none
        was)."""
        if self.wandb.log_checkpoints:
            self._log(tracker, CHECKPOINT_ARTIFACT_TYPE, checkpoint_artifact_name(self.run_id), [checkpoint],
                      ["latest", f"step-{step}"], lambda: {"step": step, "run_id": self.run_id,
                                                          "files": file_hashes(checkpoint)})
        mode = self.wandb.log_model
        if mode == "none" or (mode == "final" and not final) or (mode == "best" and not is_best):
            return None
        aliases = [f"step-{step}"] + (["final"] if final else []) + (["best"] if is_best and mode != "final" else [])
        policy = checkpoint / "policy"

        def metadata() -> dict[str, Any]:
            files = {**file_hashes(policy), TRAINING_CONFIG: file_hash(checkpoint / TRAINING_CONFIG)}
            return {**self.base_metadata, **policy_metadata(step, metrics, measured, evaluation), "metric": self.metric,
                    "metric_suite": self.suite, "files": files}

        logged = self._log(tracker, POLICY_ARTIFACT_TYPE, policy_artifact_name(self.run_id),
                           [policy, checkpoint / TRAINING_CONFIG], aliases, metadata)
        return aliases if logged else None

    def _log(self, tracker: Any, kind: str, name: str, paths: list[Path], aliases: list[str],
             metadata: Callable[[], dict[str, Any]]) -> bool:
        import wandb

        try:
            artifact = wandb.Artifact(name, type=kind, metadata=metadata())
            for path in paths:
                artifact.add_dir(str(path)) if path.is_dir() else artifact.add_file(str(path), name=path.name)
            tracker.log_artifact(artifact, aliases=aliases)
        except Exception as error:  # hashing or staging failed (disk full, unwritable folder): the run must go on
            logger.warning("W&B artifact %s (%s) was not logged, the local checkpoint is intact: %s: %s", name,
                           ", ".join(aliases), type(error).__name__, error)
            return False
        return True


def policy_metadata(step: int, metrics: Mapping[str, float], measured: Mapping[str, int],
                    evaluation: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    """What a policy version was at `step`: its latest validation metrics with the step they were measured at
    (`validation_step`: the checkpoint's own step when validation and checkpoints share a schedule) and, when the
    simulator evaluated these very weights during training (at `step`), each suite's success rate with its
    episodes, 95% interval and results file (`evaluations`, the list later evaluations are attached to)."""
    validation = {key: value for key, value in metrics.items() if key.startswith("val/")}
    return {"step": step, "validation": validation,
            "validation_step": measured.get(VALIDATION_METRIC) if validation else None,
            "evaluations": [dict(record) for record in evaluation or [] if record.get("step") == step]}


def run_metadata(config: TrainConfig, stats: NormStats, references: Mapping[str, Any]) -> dict[str, Any]:
    """What every policy version of a run shares: each data source (a local one by its folder's name, as in the
    policy's statistics) with the fingerprint of its frames, the frozen encoders (ids and weight hashes), the
    atlas-vla version and the git commit (`git_commit`)."""
    from atlas_vla import __version__

    sources = stats.per_source(public_name(config.data.sources[0]))
    return {"data": {"sources": sources, "fingerprint": stats.fingerprint, "num_frames": stats.num_frames},
            "backbones": dict(references), "atlas_vla_version": __version__, "git": git_commit()}
