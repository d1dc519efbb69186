"""Closed-loop recipe check: generate demonstrations in new layouts from recorded LIBERO ones, train one
instruction-conditioned Atlas policy on both, and measure it in the simulator on initial states it never saw,
on LIBERO-PRO's perturbed suites and on layouts nobody trained or chose on.

    MUJOCO_GL=egl python benchmarks/closed_loop_sim.py --perturbations swap,object,lan,task       # the whole recipe
    MUJOCO_GL=egl python benchmarks/closed_loop_sim.py --data PATH/other_demos --tasks 4,5,6 --perturbations swap
    MUJOCO_GL=egl python benchmarks/closed_loop_sim.py --skip-train --perturbations swap          # evaluate again
    MUJOCO_GL=egl python benchmarks/closed_loop_sim.py --generate 0 --config configs/sim_demos.yaml  # no generation

1. **Generation** (`atlas-vla generate-demos`, `--generate N` episodes per task, the other objects of the goal's
   kind moved too unless `--no-other-goals`) into `outputs/generated/<key>`, the key a hash of the sources and the
   generation settings: a second seed, or a rerun, reuses what a first one generated, and a killed generation
   continues where it stopped.
2. **Training**: `accelerate launch train.py --config CONFIG` on the sources and the generated folder as one.
   Then `atlas-vla eval-offline` on the run's whole validation split, per source: how well the policy fits
   held-out recorded episodes and held-out generated layouts, measured in a minute without the simulator.
3. **Evaluation**: `atlas-vla eval-libero` with the config's `eval:` section (its tasks and initial states unless
   `--tasks` / `--initial-states` say otherwise) on the base suite and each of `--perturbations`, then the same
   episodes with every movable object laid out anew (`--layouts random --layout-seed S`, a seed stream of the
   evaluation's own: no generation run draws them; the default seed is the reported one, choose on others).

Writes `<output-dir>/closed_loop_summary.json`: every suite's per-task successes/episodes with 95% Wilson
intervals and the phases its failures ended in, the random-layout figure, the offline validation errors per
source, the generation report's counts and the minutes each stage took. Extra arguments after `--` go to train.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from atlas_vla.config import load_config
from atlas_vla.eval.intervals import format_rate
from atlas_vla.generation.generate import Settings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = [REPO.parent / "shared" / "fixtures" / "libero" / name for name in ("sim_demos", "sim_demos_more")]
RANDOM_LAYOUT_SEED = 1000  # the reported random-layout figure's seed: candidates are chosen on other seeds


def generated_folder(root: Path, sources: list[str], seed: int, other_goals: bool) -> Path:
    """Where the generation of these settings lives (`sources` resolved, so one spelling of a folder has one key),
    by the re-targeting controller of this version (a new controller generates anew). `num_demos` is not part of
    the key: asking for more episodes continues the same tries (generate-demos keeps each task's first N kept
    tries)."""
    key = json.dumps(asdict(Settings(sources, seed, other_goals)), sort_keys=True)  # what continues a generation
    return root / hashlib.sha256(key.encode()).hexdigest()[:12]


def run(command: list[str], env: dict[str, str]) -> float:
    """Run `command` in the repository (failing loudly); the minutes it took."""
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True)
    return (time.perf_counter() - start) / 60


def suite_rows(results: dict[str, Any]) -> dict[str, Any]:
    """Each suite of an eval-libero results file: per task successes/episodes with the interval, overall, failures."""
    rows = {}
    for suite, row in (results.get("suites") or {results["suite"]: results}).items():
        rows[suite] = {"overall": format_rate(row["successes"], row["episodes"]),
                       "success_rate": row["success_rate"], "episodes": row["episodes"],
                       "tasks": {task: format_rate(t["successes"], t["episodes"]) for task, t in row["tasks"].items()},
                       "failures": row.get("failures", {}), "errors": row.get("errors", 0),
                       "task_failures": {task: t.get("failures", {}) for task, t in row["tasks"].items()}}
    return rows


def offline_rows(metrics: dict[str, float], sources: list[str]) -> dict[str, Any]:
    """eval-offline's pose and gripper errors and the mean-action baseline's pose error, over the validation split
    ("all") and for each source that has validation episodes."""
    keys = ("pose_l1_error", "gripper_error", "baseline_pose_l1_error")
    rows = {"all": {key: round(metrics[f"val/{key}"], 4) for key in keys}}
    for index, source in enumerate(sources):
        if f"val/source_{index}/pose_l1_error" in metrics:
            rows[source] = {key: round(metrics[f"val/source_{index}/{key}"], 4) for key in keys}
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "sim_layouts.yaml"))
    parser.add_argument("--data", action="append", default=None,
                        help="recorded demonstrations (LeRobot v2 folder or Hub id); repeat it to train on several "
                             f"as one (default: {' and '.join(map(str, DEFAULT_DATA))})")
    parser.add_argument("--output-dir", default=str(REPO / "outputs" / "closed_loop_sim"))
    parser.add_argument("--generate", type=int, default=60, metavar="N",
                        help="generated episodes per task (0: train on the recorded ones only)")
    parser.add_argument("--generation-seed", type=int, default=0)
    parser.add_argument("--no-other-goals", action="store_true",
                        help="generate for each task's own goal only (default: the other bowl as a goal too)")
    parser.add_argument("--generated-root", default=str(REPO / "outputs" / "generated"))
    parser.add_argument("--perturbations", default="", metavar="swap,object,lan,task",
                        help="LIBERO-PRO suites evaluated beside the base suite")
    parser.add_argument("--no-random-layouts", action="store_true", help="skip the evaluation on random layouts")
    parser.add_argument("--layout-seed", type=int, default=RANDOM_LAYOUT_SEED,
                        help="the random layouts' seed (choose candidates on other seeds)")
    parser.add_argument("--skip-train", action="store_true", help="evaluate <output-dir>/final as it is")
    parser.add_argument("--overwrite", action="store_true", help="delete <output-dir> from an earlier run first")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="simulator workers (default: the config's for evaluation, 2 for generation)")
    parser.add_argument("--initial-states", default=None, help="override the config's, e.g. 30-49")
    parser.add_argument("--tasks", default=None, help="override the config's evaluated tasks, e.g. 0,1,2")
    parser.add_argument("train_args", nargs="*", help="after --: more train.py overrides")
    args = parser.parse_args()

    # every path as the user meant it, from where they ran this: the commands below run in the repository
    out = Path(args.output_dir).resolve()
    config = str(Path(args.config).resolve())
    sources = [str(Path(s).resolve()) if Path(s).exists() else s for s in args.data or map(str, DEFAULT_DATA)]
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    workers = ["--num-workers", str(args.num_workers)] if args.num_workers else []
    summary: dict[str, Any] = {"config": config, "sources": sources}

    if args.generate > 0 and not args.skip_train:  # an evaluation of a trained policy needs no generation
        generated = generated_folder(Path(args.generated_root).resolve(), sources, args.generation_seed,
                                     not args.no_other_goals)
        command = ["atlas-vla", "generate-demos", *[f"--source={s}" for s in sources], "--output", str(generated),
                   "--num-demos", str(args.generate), "--seed", str(args.generation_seed),
                   "--num-workers", str(args.num_workers or 2), *([] if args.no_other_goals else ["--other-goals"])]
        minutes = run(command, env)
        report = json.loads((generated / "generation.json").read_text())
        summary["generation"] = {"folder": str(generated), "minutes_this_run": round(minutes, 2),
                                 "worker_minutes": round(sum(t["worker_seconds"] for t in report["tasks"].values())
                                                         / 60, 1),
                                 "tasks": {task: {k: row[k] for k in ("tries", "kept", "used", "rejected")}
                                           for task, row in report["tasks"].items()}}
        sources = [*sources, str(generated)]

    if not args.skip_train:
        if out.exists() and args.overwrite:
            shutil.rmtree(out)
        import torch

        # with no GPU and no `accelerate config`, a bare `accelerate launch` runs one process with
        # OMP_NUM_THREADS=1; --cpu gives that process every core
        device = [] if torch.cuda.is_available() else ["--cpu", "--num_processes", "1"]
        data_source = sources[0] if len(sources) == 1 else json.dumps(sources)  # a JSON list is a YAML list
        summary["train_minutes"] = round(run(["accelerate", "launch", *device, "train.py", "--config", config,
                                              "--data.source", data_source, "--output_dir", str(out),
                                              *args.train_args], env), 2)

    # the held-out episodes of every source, generated layouts among them, scored without the simulator
    offline = out / "offline_metrics.json"
    summary["offline_minutes"] = round(run(["atlas-vla", "eval-offline", "--policy", str(out / "final"), "--config",
                                             str(out / "config.yaml"), "--output", str(offline)], env), 2)
    summary["offline_validation"] = offline_rows(json.loads(offline.read_text())["metrics"],
                                                 load_config(out / "config.yaml").data.sources)

    # the config's eval: section chooses the episodes (atlas-vla eval-libero --config); flags override it
    evaluate = ["atlas-vla", "eval-libero", "--policy", str(out / "final"), "--config", config, *workers]
    evaluate += ["--tasks", args.tasks] if args.tasks else []
    states = ["--initial-states", args.initial_states] if args.initial_states else []
    command = [*evaluate, *states, "--video-dir", str(out / "videos"), "--output", str(out / "eval_results.json")]
    command += ["--perturbations", args.perturbations] if args.perturbations else []
    summary["eval_minutes"] = round(run(command, env), 2)
    summary["suites"] = suite_rows(json.loads((out / "eval_results.json").read_text()))
    summary["videos"] = str(out / "videos")

    if not args.no_random_layouts:  # the same tasks and initial states, each laid out anew
        command = [*evaluate, *states, "--layouts", "random",
                   "--layout-seed", str(args.layout_seed), "--video-dir", str(out / "videos_random_layouts"),
                   "--output", str(out / "eval_random_layouts.json")]
        minutes = run(command, env)
        [(suite, row)] = suite_rows(json.loads((out / "eval_random_layouts.json").read_text())).items()
        summary["random_layouts"] = {"suite": suite, "layout_seed": args.layout_seed,
                                     "minutes": round(minutes, 2), **row}

    (out / "closed_loop_summary.json").write_text(json.dumps(summary, indent=2))
    print("\nclosed-loop check:", json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
