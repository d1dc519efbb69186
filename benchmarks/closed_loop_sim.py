"""Closed-loop learning check: train one instruction-conditioned Atlas policy on real LIBERO simulator
demonstrations, then measure its success in the simulator on initial states it never saw.

    MUJOCO_GL=egl python benchmarks/closed_loop_sim.py                 # train (<= 60 min on 2 CPU cores) + evaluate
    MUJOCO_GL=egl python benchmarks/closed_loop_sim.py --skip-train    # evaluate the policy already trained there
    MUJOCO_GL=egl python benchmarks/closed_loop_sim.py --overwrite     # train again from scratch in the same folder

Training is `accelerate launch train.py --config configs/sim_demos.yaml` on the 100 demonstrations in
`../shared/fixtures/libero/sim_demos` and `sim_demos_more` (libero_spatial tasks 0, 1, 2, 3 and 7, initial
states 0-19; `--data` chooses others); evaluation is `atlas-vla eval-libero --config` with the config's `eval:`
section (tasks 0, 1, 2, 3 and 7, initial states 30-49, the full
protocol: 10 settling steps, 220 max steps) in parallel simulator workers. Prints the per-task and
average success rates with their 95% Wilson intervals, the phases the failed episodes ended in (no grasp, grasp
lost, not placed, timed out holding), the training and evaluation times, and where the videos are; writes them to
`<output-dir>/closed_loop_summary.json`. Extra arguments after `--` go to train.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from atlas_vla.eval.intervals import format_rate

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = [REPO.parent / "shared" / "fixtures" / "libero" / name for name in ("sim_demos", "sim_demos_more")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "sim_demos.yaml"))
    parser.add_argument("--data", action="append", default=None,
                        help="the demonstrations (LeRobot v2 folder or Hub id); repeat it to train on several as one "
                             f"(default: {' and '.join(map(str, DEFAULT_DATA))})")
    parser.add_argument("--output-dir", default=str(REPO / "outputs" / "closed_loop_sim"))
    parser.add_argument("--skip-train", action="store_true", help="evaluate <output-dir>/final as it is")
    parser.add_argument("--overwrite", action="store_true", help="delete <output-dir> from an earlier run first")
    parser.add_argument("--num-workers", type=int, default=None, help="simulator workers (default: the config's)")
    parser.add_argument("--initial-states", default=None, help="override the config's, e.g. 30-49")
    parser.add_argument("--tasks", default=None, help="override the config's evaluated tasks, e.g. 0,1,2")
    parser.add_argument("train_args", nargs="*", help="after --: more train.py overrides")
    args = parser.parse_args()

    out = Path(args.output_dir)
    sources = args.data or [str(path) for path in DEFAULT_DATA]
    data_source = sources[0] if len(sources) == 1 else json.dumps(sources)  # a JSON list is a YAML list
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}

    train_seconds = None
    if not args.skip_train:
        if out.exists() and args.overwrite:
            shutil.rmtree(out)
        import torch

        # with no GPU and no `accelerate config`, a bare `accelerate launch` runs one process with
        # OMP_NUM_THREADS=1; --cpu gives that process every core
        device = [] if torch.cuda.is_available() else ["--cpu", "--num_processes", "1"]
        command = ["accelerate", "launch", *device, "train.py", "--config", args.config, "--data.source", data_source,
                   "--output_dir", str(out), *args.train_args]
        print("$", " ".join(command), flush=True)
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, env=env, check=True)
        train_seconds = time.perf_counter() - start
        print(f"training took {train_seconds / 60:.1f} min", flush=True)

    # the config's eval: section chooses the episodes (atlas-vla eval-libero --config); flags override it
    command = ["atlas-vla", "eval-libero", "--policy", str(out / "final"), "--config", args.config,
               "--video-dir", str(out / "videos"), "--output", str(out / "eval_results.json")]
    command += ["--initial-states", args.initial_states] if args.initial_states else []
    command += ["--tasks", args.tasks] if args.tasks else []
    command += ["--num-workers", str(args.num_workers)] if args.num_workers else []
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True)
    eval_seconds = time.perf_counter() - start

    results = json.loads((out / "eval_results.json").read_text())
    summary = {
        "success_rate": results["success_rate"], "interval_95": results["interval_95"],
        "overall": format_rate(results["successes"], results["episodes"]),
        "tasks": {task: format_rate(row["successes"], row["episodes"]) for task, row in results["tasks"].items()},
        "failures": results["failures"],
        "task_failures": {task: row["failures"] for task, row in results["tasks"].items()},
        "episodes": results["episodes"], "errors": results["errors"],
        "train_minutes": None if train_seconds is None else round(train_seconds / 60, 2),
        "eval_minutes": round(eval_seconds / 60, 2), "videos": str(out / "videos"),
    }
    (out / "closed_loop_summary.json").write_text(json.dumps(summary, indent=2))
    print("\nclosed-loop check:", json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
