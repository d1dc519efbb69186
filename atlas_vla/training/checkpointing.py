"""Checkpoints: `output_dir/checkpoints/checkpoint-{global_step}`, complete or absent, with retention.

`accelerator.save_state` runs on every rank (DeepSpeed/FSDP need that) into a temporary folder;
the main process then adds the training state and the resolved config and renames the folder, so a
crash during a save never produces a folder that `latest` would pick. Each checkpoint also holds the
exported policy (`policy/`, loadable by `AtlasPolicy.from_pretrained`), written by a save hook.
`resume_state` (stage 4 of a run) loads one back, naming the model settings that differ when it cannot.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from atlas_vla.config import CheckpointConfig, TrainingConfig, load_yaml
from atlas_vla.files import swap_in_folder
from atlas_vla.models.config import PolicyConfig
from atlas_vla.schema import flatten, from_dict, to_dict
from atlas_vla.wandb_artifacts import CHECKPOINT_ARTIFACT_TYPE, download, is_wandb_reference

logger = logging.getLogger("atlas_vla.train")

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "training_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainingState:
    """Where training stands: what a resumed run needs beyond Accelerate's own state."""

    global_step: int  # optimizer updates done
    epoch: int  # epoch the next batch belongs to
    batches_in_epoch: int  # micro-batches of that epoch already consumed (skipped on resume)
    wandb_run_id: str | None = None
    best_metric: str | None = None  # the metric of the W&B `best` alias (`training.artifacts.best_metric`)
    best_metric_value: float | None = None  # its best value at a checkpoint so far

    def save(self, folder: Path) -> None:
        (folder / STATE_NAME).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> "TrainingState":
        path = folder / STATE_NAME
        if not path.is_file():
            raise ValueError(f"{folder} is not a complete atlas-vla checkpoint: {STATE_NAME} is missing")
        try:
            return from_dict(cls, json.loads(path.read_text()), str(path))
        except (json.JSONDecodeError, ValueError) as error:
            raise ValueError(f"{path} is unreadable: {error}") from error


def check_random_states_restored(folder: Path, process_index: int) -> None:
    """Raise `ValueError` unless this process's random state was restored from `folder`.

    `Accelerator.load_state` skips an unreadable `random_states_<rank>.pkl` with an INFO line, and the
    run would go on with other random numbers: compare the restored torch generator with the file
    (read the way Accelerate reads it, `weights_only`)."""
    from accelerate.utils import load
    from accelerate.utils.constants import RNG_STATE_NAME

    path = folder / f"{RNG_STATE_NAME}_{process_index}.pkl"
    try:
        saved = load(path, map_location="cpu")["torch_manual_seed"]
    except Exception as error:
        raise ValueError(f"cannot resume exactly from {folder}: {path.name} is unreadable "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    if not torch.equal(saved, torch.get_rng_state()):
        raise ValueError(f"cannot resume exactly from {folder}: the random state in {path.name} was not restored")


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def _checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """Every `checkpoint-{step}` folder, complete or not, oldest first (temporary folders are ignored)."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (numeric order; temporary folders are ignored)."""
    return [p for p in _checkpoint_folders(output_dir) if (p / STATE_NAME).is_file()]


def check_output_dir(output_dir: Path) -> None:
    """Fail with a `ValueError` before any loading when `output_dir` cannot become the run's folder: it is a
    file, or its nearest existing parent is not a writable folder."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"training.output_dir {str(output_dir)!r} is a file; expected a folder (or a path to create)")
    existing = next(p for p in (output_dir, *output_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"training.output_dir {str(output_dir)!r} cannot be written: {existing} is not a "
                         f"writable folder")


def check_fresh_output_dir(output_dir: str | os.PathLike) -> None:
    """Fail with a `ValueError` when a new (non-resumed) run would write into an earlier run's checkpoints.

    Checkpoints are named by step, so a new run would mix its `checkpoint-2` with an old
    `checkpoint-1000`, and retention (newest by step) would delete the new run's folders instead of
    the old ones. The user either continues the earlier run or picks another folder.
    """
    found = [p.name for p in _checkpoint_folders(output_dir)]
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ValueError(f"training.output_dir {str(output_dir)!r} already holds checkpoints of an earlier run in "
                         f"{checkpoints_dir(output_dir)} ({shown}): pass --resume_from_checkpoint latest to continue it, or choose "
                         f"another --output_dir for a new run")


def resolve_resume(output_dir: str | os.PathLike, resume_from: str | None) -> Path | None:
    """The checkpoint folder to resume from: `latest` (None if there is none yet), a given path, or a checkpoint a
    run logged to W&B (`wandb:ENTITY/PROJECT/NAME:ALIAS`, downloaded once and checked)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = download(resume_from, CHECKPOINT_ARTIFACT_TYPE) if is_wandb_reference(resume_from) else Path(resume_from)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
    TrainingState.load(path)  # fails clearly on an incomplete folder
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | os.PathLike, state: TrainingState,
                    total_limit: int | None, extra_files: dict[str, str] | None = None) -> Path:
    """Save a complete checkpoint for `state.global_step` on all ranks; apply retention on the main one."""
    folder = checkpoints_dir(output_dir)
    final = folder / f"checkpoint-{state.global_step}"
    tmp = folder / f".tmp-checkpoint-{state.global_step}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # every rank: model, optimizer, scheduler, RNG, sampler
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state.save(tmp)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            swap_in_folder(tmp, final)  # replaces e.g. the step a resumed run started from
    except OSError as error:  # disk full, permission denied: say where, keep what was saved before
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(error.errno, f"saving checkpoint-{state.global_step} failed: {error.strerror or error} "
                                   f"({error.filename or tmp}); the checkpoints saved before are intact",
                      error.filename) from None
    if accelerator.is_main_process:
        apply_retention(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def apply_retention(output_dir: str | os.PathLike, total_limit: int | None) -> None:
    """Delete all but the newest `total_limit` complete checkpoints (main process only). Also run when a
    run resumes: a kill right after a checkpoint was renamed into place skipped it."""
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)


def resume_state(accelerator: Accelerator, resume_dir: Path | None, checkpoint_cfg: CheckpointConfig,
                 output_dir: Path, model_cfg: PolicyConfig, training_cfg: TrainingConfig) -> TrainingState:
    """Stage 4: load the accelerator state from `resume_dir` and return where training stands (step 0 without)."""
    if resume_dir is None:
        if checkpoint_cfg.resume_from_checkpoint == "latest":
            logger.info("no checkpoint in %s yet: starting a new run", output_dir)
        return TrainingState(global_step=0, epoch=0, batches_in_epoch=0)
    state = TrainingState.load(resume_dir)  # a bad file fails before any state is touched
    try:
        accelerator.load_state(str(resume_dir))
    except Exception as error:
        raise ValueError(f"cannot resume from {resume_dir}: "
                         f"{_setting_differences(resume_dir, model_cfg, training_cfg) or str(error).splitlines()[0]}"
                         ) from None
    check_random_states_restored(resume_dir, accelerator.process_index)
    logger.info("resumed from %s at step %d", resume_dir, state.global_step)
    return state


# the training keys that give the optimizer a second parameter group, which a checkpoint's optimizer state must
# match (their values may change on a resume: `optimization.keep_configured_settings`)
GROUP_KEYS = ("locate_learning_rate", "locate_lr_scheduler")


def _setting_differences(checkpoint: Path, model_cfg: PolicyConfig, training_cfg: TrainingConfig) -> str | None:
    """'it was saved with model.a = x (this config: y), ...' when the checkpoint's `config.yaml` has another model
    section than this run, or `GROUP_KEYS` that give another number of groups; None when they agree or the file cannot
    be read."""
    try:
        recorded = load_yaml(checkpoint / "config.yaml")
    except (OSError, ValueError):
        return None
    groups = {key: (recorded.get("training") or {}).get(key) for key in GROUP_KEYS}
    if any(groups.values()) == (training_cfg.locate_group() is not None):
        groups = {key: getattr(training_cfg, key) for key in GROUP_KEYS}  # the same groups: nothing to name
    saved = flatten({"model": recorded.get("model", {}), "training": groups})
    mine = flatten({"model": to_dict(model_cfg), "training": {key: getattr(training_cfg, key) for key in GROUP_KEYS}})
    differ = [f"{key} = {saved.get(key)!r} (this config: {mine.get(key)!r})"
              for key in sorted(set(saved) | set(mine)) if saved.get(key) != mine.get(key)]
    return f"it was saved with {', '.join(differ)}; resume with the same settings" if differ else None
