"""`atlas-vla` command line: one subcommand per user task.

Each subcommand is a small `_add_<name>` function that declares its arguments and a `_run_<name>`
handler that calls the library; the library does the work, so everything here is also usable from
Python. A user mistake raises `ValueError`/`FileNotFoundError` in the library and is printed here as
one line with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Sequence

# Each entry: (name, help, add_arguments, run). Subcommands register below, one section each.
_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = []


def _command(name: str, help: str):
    """Register `add_arguments` for subcommand `name`; the run handler is attached with `.runner`."""

    def decorator(add_arguments: Callable[[argparse.ArgumentParser], None]):
        def attach(run: Callable[[argparse.Namespace], int]):
            _COMMANDS.append((name, help, add_arguments, run))
            return run

        add_arguments.runner = attach  # type: ignore[attr-defined]
        return add_arguments

    return decorator


# ----------------------------------------------------------------------------------------------
# data commands (data-info, convert-libero-hdf5, compute-stats, make-synthetic-libero)
# ----------------------------------------------------------------------------------------------


@_command("data-info", "Describe a LIBERO source: layout, episodes, frames, tasks, state/action dims, cameras, fps.")
def _add_data_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="Hub dataset id, LeRobot v2/v3 folder, or save_to_disk folder")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (Hub ids only)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


@_add_data_info.runner
def _run_data_info(args: argparse.Namespace) -> int:
    import json

    from atlas_vla.data.libero import describe

    info = describe(args.source, revision=args.revision)
    if args.json:
        print(json.dumps(info))
        return 0
    ids = info["episode_ids"]
    rows = [
        ("source", info["source"] + (f" @ {info['revision']}" if info["revision"] else "")),
        ("layout", info["layout"]),
        ("schema", info["schema"]),
        ("episodes", f"{info['num_episodes']}" + (f" (indices {ids[0]}..{ids[-1]})" if ids else "")),
        ("frames", str(info["num_frames"])),
        ("fps", str(info["fps"] if info["fps"] is not None else "unknown")),
        ("state_dim", str(info["state_dim"])),
        ("action_dim", str(info["action_dim"])),
        ("cameras", ", ".join(info["cameras"])),
        ("columns", ", ".join(f"{canonical} <- {source}" for canonical, source in info["columns"].items())),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"{'tasks':<{width}}  {len(info['tasks'])}")
    for index, task in enumerate(info["tasks"]):
        print(f"{'':<{width}}  {index:>3}  {task}")
    return 0


@_command("convert-libero-hdf5", "Convert raw LIBERO *_demo.hdf5 files to a dataset load_libero reads.")
def _add_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR", help="*_demo.hdf5 files or folders of them")
    parser.add_argument("--output", required=True, help="output folder (appears only when complete)")
    parser.add_argument("--format", choices=("lerobot_v2", "saved_dataset"), default="lerobot_v2",
                        help="LeRobot v2 layout (like physical-intelligence/libero) or Dataset.save_to_disk")
    parser.add_argument("--no-rotate", action="store_true", help="keep the raw upside-down (OpenGL) images")
    parser.add_argument("--image-size", type=int, default=None, help="resize both cameras to N x N pixels")
    parser.add_argument("--filter-noops", action="store_true", help="drop idle steps as OpenVLA's re-rendering does")
    parser.add_argument("--fps", type=int, default=20, help="control rate recorded in info.json (LIBERO: 20)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


@_add_convert.runner
def _run_convert(args: argparse.Namespace) -> int:
    from atlas_vla.data.hdf5 import convert_libero_hdf5

    path = convert_libero_hdf5(args.inputs, args.output, output_format=args.format, rotate=not args.no_rotate,
                               image_size=args.image_size, filter_noops=args.filter_noops, fps=args.fps,
                               overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


@_command("compute-stats", "Compute action/state normalisation statistics of a LIBERO source's training split.")
def _add_compute_stats(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="Hub dataset id, LeRobot v2/v3 folder, or save_to_disk folder")
    parser.add_argument("--output", required=True, help="statistics JSON file to write")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (Hub ids only)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of episodes held out (as in training)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the episode split (as in training)")


@_add_compute_stats.runner
def _run_compute_stats(args: argparse.Namespace) -> int:
    from atlas_vla.data.libero import DataConfig, load_train_val
    from atlas_vla.data.normalization import compute_norm_stats

    config = DataConfig(source=args.source, revision=args.revision, val_fraction=args.val_fraction,
                        split_seed=args.split_seed)
    train, _ = load_train_val(config)
    stats = compute_norm_stats(train)
    path = stats.save(args.output)
    print(f"wrote {path}: {stats.num_frames} frames, fingerprint {stats.fingerprint}")
    return 0

@_command("make-synthetic-libero", "Write the small, learnable LIBERO-format dataset of the demo and the tests.")
def _add_make_synthetic(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="folder to write (LeRobot v2 layout)")
    parser.add_argument("--episodes", type=int, default=160, help="number of episodes (alternating two instructions)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same dataset)")
    parser.add_argument("--image-size", type=int, default=96, help="camera image side in pixels")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


@_add_make_synthetic.runner
def _run_make_synthetic(args: argparse.Namespace) -> int:
    from atlas_vla.data.synthetic import make_synthetic_libero

    path = make_synthetic_libero(args.output, num_episodes=args.episodes, seed=args.seed,
                                 image_size=args.image_size, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0

# ----------------------------------------------------------------------------------------------
# policy commands (predict, export)
# ----------------------------------------------------------------------------------------------


@_command("predict", "Run a saved policy on one observation file (.npz) and print its action chunk.")
def _add_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="saved policy folder or Hub model id")
    parser.add_argument("--observation", required=True,
                        help=".npz with agentview_image, wrist_image (upright HWC uint8), state (8,), task_description")
    parser.add_argument("--json", action="store_true", help='print {"actions": [[7 floats], ...]}')


@_add_predict.runner
def _run_predict(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from atlas_vla.constants import OBSERVATION_KEYS
    from atlas_vla.models.policy import AtlasPolicy

    path = Path(args.observation)
    if not path.is_file():
        raise FileNotFoundError(f"observation file not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        missing = [key for key in OBSERVATION_KEYS if key not in data.files]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}; expected {list(OBSERVATION_KEYS)}, found {data.files}")
        observation = {key: data[key] for key in OBSERVATION_KEYS}
    observation["task_description"] = str(observation["task_description"])
    actions = AtlasPolicy.from_pretrained(args.checkpoint).predict_action(observation)
    if args.json:
        print(json.dumps({"actions": actions.tolist()}))
    else:
        print("step      dx       dy       dz    droll   dpitch     dyaw  gripper")
        for step, action in enumerate(actions):
            print(f"{step:>4} " + " ".join(f"{value:8.4f}" for value in action))
    return 0

# ----------------------------------------------------------------------------------------------
# evaluation commands (eval-offline, eval-libero)
# ----------------------------------------------------------------------------------------------

@_command("eval-offline", "The training loop's val/* metrics of a saved policy on any LIBERO dataset split.")
def _add_eval_offline(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="saved policy folder or Hub model id")
    parser.add_argument("--data", required=True, help="Hub dataset id, LeRobot v2/v3 folder, or save_to_disk folder")
    parser.add_argument("--split", choices=("val", "train", "all"), default="val", help="episode split to score")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="as in training (data.val_fraction)")
    parser.add_argument("--split-seed", type=int, default=0, help="as in training (data.split_seed)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batches", type=int, default=None, help="score at most this many batches")
    parser.add_argument("--output", default=None, help="also write the metrics as JSON here")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


@_add_eval_offline.runner
def _run_eval_offline(args: argparse.Namespace) -> int:
    import json

    from atlas_vla.eval.offline import evaluate_offline, save_metrics

    metrics = evaluate_offline(args.checkpoint, args.data, split=args.split, val_fraction=args.val_fraction,
                               split_seed=args.split_seed, batch_size=args.batch_size, max_batches=args.max_batches)
    if args.output:
        save_metrics(args.output, metrics, {k: v for k, v in vars(args).items() if not k.startswith("_")})
    if args.json:
        print(json.dumps(metrics))
    else:
        width = max(len(key) for key in metrics)
        for key, value in metrics.items():
            print(f"{key:<{width}}  {value:.5f}")
    return 0


@_command("eval-libero", "Closed-loop success rates of a policy in the LIBERO simulator (standard protocol).")
def _add_eval_libero(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="saved policy folder or Hub model id")
    parser.add_argument("--suite", required=True,
                        choices=("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"))
    parser.add_argument("--tasks", default=None, help="task ids, e.g. 0,3 or 0-4 (default: every task of the suite)")
    parser.add_argument("--trials", type=int, default=50, help="episodes per task: initial states 0..trials-1")
    parser.add_argument("--initial-states", default=None, help="explicit initial states, e.g. 30-49 (overrides --trials)")
    parser.add_argument("--max-steps", type=int, default=None, help="policy steps per episode (default: the suite's)")
    parser.add_argument("--replan-steps", type=int, default=None,
                        help="actions executed per query (default: the policy's whole chunk)")
    parser.add_argument("--temporal-ensemble", type=float, default=None, metavar="DECAY",
                        help="query every step and average overlapping chunks, weights exp(-DECAY * i) from the "
                             "oldest (ACT; e.g. 0.1); replaces --replan-steps")
    parser.add_argument("--camera-size", type=int, default=256, help="simulator camera resolution (protocol: 256)")
    parser.add_argument("--video-dir", default=None, help="write one mp4 per episode here")
    parser.add_argument("--num-workers", type=int, default=1, help="parallel simulator worker processes")
    parser.add_argument("--episode-timeout", type=float, default=900.0, help="seconds before a hung episode is killed")
    parser.add_argument("--output", default="eval_results.json", help="results JSON file")
    parser.add_argument("--report_to", choices=("none", "wandb"), default="none", help="also log to W&B")
    parser.add_argument("--seed", type=int, default=0, help="env.seed of every episode")


@_add_eval_libero.runner
def _run_eval_libero(args: argparse.Namespace) -> int:
    from atlas_vla.eval import libero_sim as sim

    try:
        sim.require_simulator()
    except sim.SimulatorMissing as error:
        print(f"atlas-vla eval-libero: {error}", file=sys.stderr)
        return 2
    from libero.libero import benchmark

    num_tasks = benchmark.get_benchmark_dict()[args.suite]().n_tasks
    tasks = sim.parse_range(args.tasks) if args.tasks else list(range(num_tasks))
    states = sim.parse_range(args.initial_states) if args.initial_states else list(range(args.trials))
    max_steps = args.max_steps or sim.SUITE_MAX_STEPS[args.suite]
    for task in tasks:  # range-check tasks and initial states once, before any worker starts
        _, _, init_states = sim.task_info(args.suite, task)
        bad = [state for state in states if not 0 <= state < len(init_states)]
        if bad:
            raise ValueError(f"{args.suite} task {task} has initial states 0..{len(init_states) - 1}, got {bad}")
    if args.temporal_ensemble is not None and args.temporal_ensemble < 0:
        raise ValueError(f"--temporal-ensemble must be >= 0, got {args.temporal_ensemble}")
    checkpoint = sim.resolve_checkpoint(args.checkpoint)
    specs = [sim.EpisodeSpec(args.suite, task, state, max_steps, args.replan_steps, args.camera_size, args.seed,
                             args.video_dir, args.temporal_ensemble) for task in tasks for state in states]

    def report(result: "sim.EpisodeResult") -> None:
        status = "error" if result.error else ("success" if result.success else "failure")
        print(f"task {result.task_id} init {result.initial_state}: {status} after {result.steps} steps "
              f"({result.seconds:.1f} s)" + (f": {result.error.splitlines()[0]}" if result.error else ""), flush=True)

    start = time.perf_counter()
    results = sim.evaluate(checkpoint, specs, num_workers=args.num_workers,
                           episode_timeout=args.episode_timeout, on_result=report)
    summary = sim.summarize(results)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    settings["seconds"] = time.perf_counter() - start
    print(sim.format_table(args.suite, summary))
    path = sim.save_results(args.output, args.suite, summary, settings)
    print(f"wrote {path}")
    if args.report_to == "wandb":
        print(f"logged to W&B run {sim.log_to_wandb(args.suite, summary, settings)}")
    return 0



def build_parser() -> argparse.ArgumentParser:
    """The `atlas-vla` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="atlas-vla", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help, add_arguments, run in _COMMANDS:
        sub = subparsers.add_parser(name, help=help, description=help)
        add_arguments(sub)
        sub.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `atlas-vla` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"atlas-vla {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
