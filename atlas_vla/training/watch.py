"""`atlas-vla eval-watch OUTPUT_DIR`: closed-loop success of every checkpoint a training run writes,
evaluated by a separate job while training goes on.

The watcher only reads the run's folder (any process, node or machine that sees it): each complete
`checkpoints/checkpoint-{step}/policy` and finally `final/`, in step order, as they appear. For each
it runs the configured episodes (the run's `eval:` section; flags override it), writes
`eval_results.json` into that folder atomically (so a restarted watcher skips it) and logs the
success rates, failure counts and videos at the checkpoint's step to W&B. It stops after `final/`.
Training never waits for it: a checkpoint that retention (`checkpoints_total_limit`) deletes before
the watcher gets to it is skipped, and one deleted while it is evaluated still gets its results
logged (the policy was loaded before) but no file.

W&B: the results go to a run of their own, `<training run id>-eval` (job type `eval`), in the
training run's group, so the success curve sits beside the loss curve in the group's view. W&B's
shared mode (several writers to one run) needs the W&B server to merge the writers, so it cannot
be used offline or be checked here; a grouped run works everywhere, offline included.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas_vla.config import TrainConfig, load_config
from atlas_vla.eval.config import EvalConfig
from atlas_vla.eval.failures import check_episodes_ran
from atlas_vla.files import write_json_atomic
from atlas_vla.schema import to_dict
from atlas_vla.training.artifacts import policy_artifact_name
from atlas_vla.training.checkpointing import list_checkpoints
from atlas_vla.training.run_folder import FINAL_DIR, RUN_ID_FILE, SUMMARY_NAME, policy_versions
from atlas_vla.training.tracking import run_group
from atlas_vla.wandb_artifacts import WandbReference, attach_evaluation

logger = logging.getLogger(__name__)
RESULTS_NAME = "eval_results.json"


@dataclass(frozen=True)
class Snapshot:
    """A policy a training run saved: `folder` (checkpoint-N or final) holds the results, `policy` the weights."""

    step: int
    folder: Path
    policy: Path

    @property
    def is_final(self) -> bool:
        return self.folder.name == FINAL_DIR


def snapshots(output_dir: Path) -> list[Snapshot]:
    """The run's saved policies in step order: complete checkpoints, then `final/` once training has
    written its summary (the final step)."""
    found = [Snapshot(int(folder.name.split("-")[1]), folder, folder / "policy")
             for folder in list_checkpoints(output_dir)]
    summary = output_dir / SUMMARY_NAME
    if (output_dir / FINAL_DIR).is_dir() and summary.is_file():
        try:
            step = int(json.loads(summary.read_text())["global_step"])
        except (OSError, ValueError, KeyError):
            step = None  # being written: the next pass reads it
        if step is not None:
            found.append(Snapshot(step, output_dir / FINAL_DIR, output_dir / FINAL_DIR))
    return found


class EvalWatcher:
    """Evaluate `output_dir`'s snapshots with `config` as they appear; `report_to` "wandb" or "none"."""

    def __init__(self, output_dir: str | Path, config: EvalConfig, *, report_to: str = "none",
                 poll_seconds: float = 30.0) -> None:
        from atlas_vla.eval import libero_sim as sim

        self.output_dir = Path(output_dir)
        self.config = config
        self.report_to = report_to
        self.poll_seconds = poll_seconds
        self._sim = sim
        sim.episode_specs(config)  # suite, tasks and initial states are checked now, not after the first wait
        if report_to == "wandb" and "wandb" not in _run_config(self.output_dir).trackers:
            raise ValueError(f"{self.output_dir} does not log to W&B (its config.yaml has no wandb tracker), so there "
                             f"is no run to log the evaluation beside; use --report-to none")
        self._done: set[int] = set()  # steps evaluated (or found evaluated) by this watcher
        self._attached: set[int] = set()  # steps whose result went to their W&B policy version
        self._wandb_run: Any = None

    def run(self, *, once: bool = False) -> int:
        """Evaluate until `final/` is done (`once`: what is there now); returns the number evaluated."""
        evaluated = 0
        try:
            while True:
                for snapshot in snapshots(self.output_dir):
                    if snapshot.is_final:
                        if not (snapshot.folder / RESULTS_NAME).is_file():
                            evaluated += self._finish(snapshot)
                        return evaluated
                    if snapshot.step in self._done:
                        continue
                    if (snapshot.folder / RESULTS_NAME).is_file():
                        self._done.add(snapshot.step)  # evaluated before a restart
                    elif self.evaluate(snapshot):
                        evaluated += 1
                if once:
                    return evaluated
                time.sleep(self.poll_seconds)
        finally:
            if self._wandb_run is not None:
                self._wandb_run.finish()

    def _finish(self, final: Snapshot) -> int:
        """`final/` holds the weights of the checkpoint saved at the same step when there is one: its results
        are copied rather than computed again. Returns how many evaluations ran (0 or 1)."""
        same = self.output_dir / "eval_watch" / f"step-{final.step}" / RESULTS_NAME
        if final.step in self._done and same.is_file():
            results = json.loads(same.read_text())
            results["settings"] = {**results["settings"], "policy": str(final.policy), "copied_from": str(same)}
            write_json_atomic(final.folder / RESULTS_NAME, results)
            if self._wandb_run is not None:  # the last step's version may be known only now
                self._attach(final.step, results)
            return 0
        return int(self.evaluate(final))

    def evaluate(self, snapshot: Snapshot) -> bool:
        """One snapshot: evaluate, write its results, log them; False when retention removed it first."""
        sim = self._sim
        start = time.perf_counter()
        video_dir = self.output_dir / "eval_watch" / f"step-{snapshot.step}" / "videos"
        try:  # evaluate() loads the policy once, first: a folder deleted after that is no longer needed
            results = sim.evaluate(sim.resolve_policy(str(snapshot.policy)),
                                   sim.episode_specs(self.config, video_dir=video_dir),
                                   num_workers=self.config.num_workers)
        except FileNotFoundError:
            logger.warning("step %d: %s was removed (checkpoints_total_limit) before it was evaluated; skipped",
                           snapshot.step, snapshot.folder)
            self._done.add(snapshot.step)
            return False
        summary = sim.summarize(results)
        settings = {"policy": str(snapshot.policy), "step": snapshot.step, "eval": to_dict(self.config),
                    "seconds": time.perf_counter() - start}
        print(f"step {snapshot.step} ({snapshot.folder.name}):\n{sim.format_table(self.config.suite, summary)}",
              flush=True)
        watch_results = sim.save_results(self.output_dir / "eval_watch" / f"step-{snapshot.step}" / RESULTS_NAME,
                                         self.config.suite, summary, settings)
        check_episodes_ran(results, watch_results)  # nothing logged, the checkpoint not marked evaluated
        if snapshot.folder.is_dir():
            sim.save_results(snapshot.folder / RESULTS_NAME, self.config.suite, summary, settings)
        else:
            logger.warning("step %d: %s was removed during its evaluation; its results are logged, not written",
                           snapshot.step, snapshot.folder)
        if self.report_to == "wandb":
            self._log(snapshot, summary)
        self._done.add(snapshot.step)
        return True

    def _log(self, snapshot: Snapshot, summary: dict[str, Any]) -> None:
        """The snapshot's `eval/*` metrics and videos in the eval run, at its step; and its result attached to the
        policy version the training run logged of it, if any."""
        import wandb

        if self._wandb_run is None:
            self._wandb_run = wandb.init(**eval_run_kwargs(self.output_dir))
        logs: dict[str, Any] = dict(self._sim.eval_metrics(self.config.suite, summary))
        logs.update({key: wandb.Video(path, format="mp4") for key, path in self._sim.episode_videos(summary).items()})
        self._wandb_run.log(logs, step=snapshot.step)  # snapshots come in step order, so W&B's steps only grow
        self._attach(snapshot.step, summary)

    def _attach(self, step: int, summary: dict[str, Any]) -> None:
        """Attach the result of `step` to the policy version the training run logged of its weights, when it logged
        one (`run_folder.policy_versions`: which depends on `wandb.log_model`, and on whether staging succeeded)."""
        if step in self._attached or step not in policy_versions(self.output_dir):
            return
        config = _run_config(self.output_dir)
        run_id = (self.output_dir / RUN_ID_FILE).read_text().strip()
        reference = WandbReference(config.wandb.entity or self._wandb_run.entity, config.wandb.project,
                                   policy_artifact_name(run_id), f"step-{step}")
        for record in self._sim.evaluation_records(self.config.suite, summary, {"eval": to_dict(self.config)},
                                                   self._wandb_run.id):
            attach_evaluation(self._wandb_run, reference, record)
        self._attached.add(step)


def eval_run_kwargs(output_dir: Path) -> dict[str, Any]:
    """`wandb.init` arguments of a training run's eval run: id `<run id>-eval`, the training run's group,
    project and entity, files under `output_dir/eval_watch` (a restarted watcher resumes the same run)."""
    run_id_file = output_dir / RUN_ID_FILE
    if not run_id_file.is_file():
        raise ValueError(f"{output_dir} has no {RUN_ID_FILE}: the training run does not log to W&B "
                         f"(train with --report_to wandb), so there is no run to log the evaluation beside")
    run_id = run_id_file.read_text().strip()
    config = _run_config(output_dir)
    folder = output_dir / "eval_watch"
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"id": f"{run_id}-eval", "project": config.wandb.project, "group": run_group(config.wandb, run_id),
              "job_type": "eval", "name": f"{config.wandb.name or output_dir.name}-eval", "resume": "allow",
              "dir": str(folder)}
    if config.wandb.entity:
        kwargs["entity"] = config.wandb.entity
    return kwargs


def _run_config(output_dir: Path) -> TrainConfig:
    return load_config(output_dir / "config.yaml")
