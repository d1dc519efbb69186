"""What a training run's output folder holds, by name: the one owner of these names, read by the trainer and by
the jobs that follow a run from outside (`atlas-vla eval-watch`) without importing the trainer."""

from __future__ import annotations

from pathlib import Path

from atlas_vla.files import read_json, write_json_atomic

METRICS_NAME = "metrics.jsonl"  # every logged scalar, one JSON object per logging step
SUMMARY_NAME = "train_summary.json"  # written with the final policy: steps, processes, checksums, timing
FINAL_DIR = "final"  # the exported policy at the end of training
RUN_ID_FILE = "wandb_run_id.txt"  # the W&B run id, so that a resumed run or an eval job joins the same run
POLICY_VERSIONS_FILE = "wandb_policy_versions.json"  # step -> aliases of each policy version logged to W&B


def policy_versions(output_dir: Path) -> dict[int, list[str]]:
    """The W&B policy versions a run logged (staged), by step: what `eval-watch` attaches its results to and what a
    model card names (empty when the run logged none, or logs no artifacts)."""
    path = Path(output_dir) / POLICY_VERSIONS_FILE
    return {int(step): aliases for step, aliases in read_json(path).items()} if path.is_file() else {}


def record_policy_version(output_dir: Path, step: int, aliases: list[str]) -> None:
    """Add the version logged at `step` (main process; a version logged again at a step, after a resume, replaces
    it: W&B moves its `step-<N>` alias to the new one)."""
    versions = {**policy_versions(output_dir), step: aliases}
    write_json_atomic(Path(output_dir) / POLICY_VERSIONS_FILE, {str(k): versions[k] for k in sorted(versions)})
