"""Tracking: what `accelerator.init_trackers` gets, the persistent W&B run id, the W&B service, and rank-0
rich media.

Accelerate already creates the tracker run on the main process only, so a multi-process job is one
W&B run. Everything that touches `wandb.Image/Table/Video` goes through `log_media`, which returns at
once on other ranks. The run id lives in `output_dir/wandb_run_id.txt` and in every checkpoint, so a
resumed job continues the same run and its step axis. The W&B service that writes the run is started
outside the launcher's process tree (`WandbService`), so a stop signal cannot end it before the trainer
has finished the run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image, ImageDraw

from atlas_vla.action_layout import GRIPPER, POSE, gripper_closed
from atlas_vla.config import WandbConfig

logger = logging.getLogger(__name__)

SERVICE_ENV = "WANDB_SERVICE"  # wandb's own variable: the address of a running W&B service to log through
SERVICE_IDLE_TIMEOUT = "60s"  # a service whose trainer died without stopping it ends this long after
SWEEP_ID_ENV = "WANDB_SWEEP_ID"  # set by the sweep agent for every trial it starts
RUN_ID_ENV = "WANDB_RUN_ID"  # the trial's run id, chosen by the sweep server


def new_run_id() -> str:
    """A fresh W&B-style run id (8 lowercase alphanumerics)."""
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))
    return "".join(np.random.default_rng().choice(alphabet, 8))


def sweep_trial_run_id() -> str | None:
    """The W&B run id of the sweep trial this process runs, or None outside a sweep.

    `wandb agent` (and `wandb.agent(sweep_id, function=...)`) exports `WANDB_SWEEP_ID` and, for each
    trial, `WANDB_RUN_ID` into the trial's environment. Inside a sweep `wandb.init` ignores any other
    run id, so this is the id the trial's run really gets.
    """
    run_id = os.environ.get(RUN_ID_ENV)
    return run_id if os.environ.get(SWEEP_ID_ENV) and run_id else None


def sweep_trial_dir(output_dir: str | os.PathLike, run_id: str) -> Path:
    """`<output_dir>/sweep-<run id>`: every sweep trial gets its own checkpoints, metrics and export.

    Trials of one sweep share the command line, hence `--output_dir`; without their own folder they
    would resume or delete each other's checkpoints. Idempotent: a folder that already is the
    trial's folder is returned unchanged, so the in-process `train_function` and `train` can both apply it.
    """
    path = Path(output_dir)
    name = f"sweep-{run_id}"
    return path if path.name == name else path / name


def run_name(config: WandbConfig, output_dir: str | os.PathLike) -> str:
    """The configured name, else `<output folder>-<date>-<time>`."""
    return config.name or f"{Path(output_dir).name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_group(config: WandbConfig, run_id: str) -> str:
    """The W&B group of a training run: the configured one, else the run's id (its eval run joins it)."""
    return config.group or run_id


def wandb_init_kwargs(config: WandbConfig, output_dir: str | os.PathLike, run_id: str) -> dict[str, Any]:
    """`init_kwargs["wandb"]` for `accelerator.init_trackers`: no secrets, files under `output_dir`."""
    import wandb

    kwargs: dict[str, Any] = {
        "id": run_id,
        "name": run_name(config, output_dir),
        "group": run_group(config, run_id),
        "resume": config.resume,
        "tags": list(config.tags),
        "notes": config.notes,
        "save_code": config.save_code,
        "dir": str(output_dir),
    }
    if config.entity:
        kwargs["entity"] = config.entity
    if config.disable_stats:
        kwargs["settings"] = wandb.Settings(x_disable_stats=True)
    return kwargs


class WandbService:
    """The W&B service (`wandb-core`) of one training run, in a session of its own and no descendant of the
    trainer, so that a launcher ending the trainer's process tree does not end it too and the trainer can
    still flush and finish the run after a stop signal.

    wandb starts its service as a child of the process that logs. Accelerate >= 1.16's one-process
    launcher answers SIGTERM by terminating the trainer and all its descendants (service included) and
    SIGKILLs them 5 s later, so the service died before the trainer had saved and finished: the run lost
    its history. `start` (just before the trackers start: the service ends itself after
    `SERVICE_IDLE_TIMEOUT` without a client) runs wandb's own `wandb beta core start`, whose short-lived
    helper leaves the service re-parented away from the trainer, and points this process at it through
    `WANDB_SERVICE`; `stop` (after the trackers ended) closes this process's connection and ends the
    service. A trainer killed outright leaves the service to write what it received and end itself
    `SERVICE_IDLE_TIMEOUT` later. A service someone else started (`WANDB_SERVICE` set: a sweep agent,
    `wandb beta core start` in a job script, a process that already logs to W&B, which sets it) is used
    as it is.
    """

    def __init__(self) -> None:
        self.token: str | None = None  # the WANDB_SERVICE value of the service this object started

    def start(self) -> None:
        if self.token is not None or os.environ.get(SERVICE_ENV) or os.environ.get("WANDB_MODE") == "disabled":
            return
        # -P: the current folder (a user's `wandb.py`?) stays off the helper's import path
        command = [sys.executable, "-P", "-m", "wandb", "beta", "core", "start", "--idle-timeout",
                   SERVICE_IDLE_TIMEOUT]
        try:
            started = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                     stdin=subprocess.DEVNULL, check=False)
            lines = started.stdout.strip().splitlines()
            reason = (started.stderr.strip().splitlines() or [f"exit code {started.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired) as error:
            started, lines, reason = None, [], str(error)
        if started is None or started.returncode != 0 or not lines:
            logger.warning("could not start a W&B service outside the launcher (%s): W&B starts its own, which "
                           "Accelerate's launcher ends with the trainer on a stop signal", reason)
            return
        self.token = lines[-1]
        os.environ[SERVICE_ENV] = self.token

    def stop(self) -> None:
        """Close this process's W&B connection and end the service; `WANDB_SERVICE` is unset whatever fails."""
        if self.token is None:
            return
        try:
            import wandb
            from wandb.cli import beta_core

            wandb.teardown()  # this process's connection goes: a later wandb.init here starts afresh
            os.environ[SERVICE_ENV] = self.token  # what beta_core.stop addresses
            with contextlib.redirect_stderr(io.StringIO()):  # its "sent shutdown request" chatter
                beta_core.stop()
        except Exception as error:  # noqa: BLE001 - a service left running ends itself once idle
            logger.warning("could not stop the W&B service at %s (it ends itself after %s idle): %s", self.token,
                           SERVICE_IDLE_TIMEOUT, error)
        finally:
            os.environ.pop(SERVICE_ENV, None)
            self.token = None


def check_tracker_installed(trackers: list[str]) -> None:
    """Fail early, with the install command, when a requested tracker package is missing."""
    import importlib.util

    packages = {"wandb": ("wandb", "pip install -e '.[wandb]'"),
                "tensorboard": ("tensorboard", "pip install -e '.[tensorboard]'")}
    for tracker in trackers:
        module, hint = packages[tracker]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--report_to {tracker} needs the {module} package: {hint}")


def _draw_actions(image: np.ndarray, predicted: np.ndarray, true: np.ndarray) -> Image.Image:
    """The camera frame with the first step's xy action as arrows: green = true, red = predicted."""
    frame = Image.fromarray(image).resize((224, 224))
    draw = ImageDraw.Draw(frame)
    centre = np.array([112.0, 112.0])
    for action, colour in ((true, (40, 220, 40)), (predicted, (230, 40, 40))):
        tip = centre + 80 * np.clip(action[:2], -1, 1)
        draw.line([tuple(centre), tuple(tip)], fill=colour, width=3)
        draw.ellipse([tip[0] - 4, tip[1] - 4, tip[0] + 4, tip[1] + 4], fill=colour)
    return frame


def log_media(accelerator: Accelerator, step: int, images: torch.Tensor, instructions: list[str],
              predicted: torch.Tensor, true: torch.Tensor, video: Path | None = None) -> None:
    """W&B images (frames with true vs. predicted actions), a per-sample table, and optionally a video.

    `images` (N, 3, H, W) uint8 agent views; `predicted`, `true` (N, H, 7) in LIBERO units;
    `video` an mp4 file. A no-op on non-main processes and without a W&B tracker.
    """
    if not accelerator.is_main_process or "wandb" not in {t.name for t in accelerator.trackers}:
        return
    import wandb

    run = accelerator.get_tracker("wandb", unwrap=True)
    frames = images.permute(0, 2, 3, 1).cpu().numpy()
    predicted, true = predicted.float().cpu().numpy(), true.float().cpu().numpy()
    columns = ["frame", "instruction", "true_action", "predicted_action", "pose_l1_error", "gripper_match"]
    table = wandb.Table(columns=columns)
    pictures = []
    for frame, text, p, t in zip(frames, instructions, predicted, true):
        picture = _draw_actions(frame, p[0], t[0])
        caption = f"{text} | green true, red predicted"
        pictures.append(wandb.Image(picture, caption=caption))
        table.add_data(wandb.Image(picture), text, np.round(t[0], 3).tolist(), np.round(p[0], 3).tolist(),
                       float(np.abs(p[:, POSE] - t[:, POSE]).mean()),
                       bool(gripper_closed(p[0, GRIPPER]) == gripper_closed(t[0, GRIPPER])))
    media: dict[str, Any] = {"media/val_frames": pictures, "media/val_predictions": table}
    if video is not None:
        media["media/val_episode"] = wandb.Video(str(video), format="mp4")
    _log_media_values(run, media, step)


def log_videos(accelerator: Accelerator, step: int, videos: Mapping[str, str]) -> None:
    """Videos (key -> mp4 file, e.g. `libero_sim.episode_videos`) in the W&B run; main process and W&B only."""
    if not videos or not accelerator.is_main_process or "wandb" not in {t.name for t in accelerator.trackers}:
        return
    import wandb

    run = accelerator.get_tracker("wandb", unwrap=True)
    _log_media_values(run, {key: wandb.Video(path, format="mp4") for key, path in videos.items()}, step)


def _log_media_values(run: Any, media: Mapping[str, Any], step: int) -> None:
    """`run.log(media)`; media W&B cannot stage (a full disk, an unwritable `WANDB_DATA_DIR`) are one warning
    line, and training goes on."""
    try:
        run.log(dict(media), step=step)
    except Exception as error:
        logger.warning("W&B media at step %d (%s) were not logged: %s: %s", step, ", ".join(media),
                       type(error).__name__, error)


def annotate_episode(frames: torch.Tensor, predicted: torch.Tensor, true: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) uint8 frames of one episode with their actions drawn -> (T, 224, 224, 3) video."""
    return np.stack([np.asarray(_draw_actions(f.permute(1, 2, 0).cpu().numpy(), p.cpu().numpy(), t.cpu().numpy()))
                     for f, p, t in zip(frames, predicted.float(), true.float())])


def metrics_table(values: Mapping[str, float]) -> str:
    """`a=1.23 b=4.56` for the console log."""
    return " ".join(f"{k}={v:.4g}" for k, v in values.items())
