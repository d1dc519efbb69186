"""What a training run's output folder holds, by name: the one owner of these names, read by the trainer and by
the jobs that follow a run from outside (`atlas-vla eval-watch`) without importing the trainer."""

from __future__ import annotations

METRICS_NAME = "metrics.jsonl"  # every logged scalar, one JSON object per logging step
SUMMARY_NAME = "train_summary.json"  # written with the final policy: steps, processes, checksums, timing
FINAL_DIR = "final"  # the exported policy at the end of training
RUN_ID_FILE = "wandb_run_id.txt"  # the W&B run id, so that a resumed run or an eval job joins the same run
