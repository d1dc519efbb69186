"""Stage 1 of a run: the `Accelerator`, the process's logging, TF32 and the global seed.

Everything random is drawn after `build_accelerator` has seeded the process, in the order of the
later stages, so the same seed gives the same run.
"""

from __future__ import annotations

import logging
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration, set_seed

from atlas_vla.config import TrainingConfig


def build_accelerator(training_cfg: TrainingConfig, log_file: str | None, trackers: list[str]) -> Accelerator:
    """The accelerator, the process's logging, TF32 and the global seed (set before anything is built)."""
    output_dir = Path(training_cfg.output_dir)
    # checked on the process state, before the Accelerator fixes its precision for the whole process
    if training_cfg.mixed_precision == "fp16" and PartialState().device.type == "cpu":
        raise ValueError("training.mixed_precision fp16 needs a GPU; this run is on the CPU, where it would have no "
                         "effect: use bf16 (CPU autocast) or no")
    accelerator = Accelerator(
        gradient_accumulation_steps=training_cfg.gradient_accumulation_steps,
        mixed_precision=training_cfg.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # rank 0 may spend long in validation or media logging: keep the other ranks from timing out
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))],
    )
    _setup_logging(accelerator, log_file)
    if training_cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(training_cfg.seed)
    return accelerator


def _setup_logging(accelerator: Accelerator, log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file and accelerator.is_main_process:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    level = logging.INFO if accelerator.is_local_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=level, handlers=handlers, force=True)
