"""`atlas-vla` command line: one subcommand per user task.

Each subcommand is a small `_add_<name>` function that declares its arguments and a `_run_<name>`
handler that calls the library; the library does the work, so everything here is also usable from
Python. A user mistake raises `ValueError`/`FileNotFoundError` in the library and is printed here as
one line with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from atlas_vla.config import TrainConfig, is_train_option, load_config, parse_overrides
from atlas_vla.data.config import DataConfig
from atlas_vla.eval.config import EvalConfig
from atlas_vla.eval.failures import EvaluationFailed, check_episodes_ran
from atlas_vla.hub import absolute_path, resolve_local
from atlas_vla.schema import print_renames_as_one_line, to_dict, warn_renamed
from atlas_vla.serving.protocol import API_KEY_ENV
from atlas_vla.wandb_artifacts import check_reference

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


class _RenamedFlag(argparse.Action):
    """An old flag spelling that keeps working: it stores into the new flag's value and warns."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        warn_renamed(str(option_string), self.new)
        setattr(namespace, self.dest, values)


def _renamed_flag(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """Keep `old` working as a deprecated spelling of the flag `new` (`kwargs`: its `type`, `choices`)."""
    parser.add_argument(old, dest=new.lstrip("-").replace("-", "_"), action=_RenamedFlag, new=new, **kwargs)


def _takes_train_overrides(parser: argparse.ArgumentParser) -> None:
    """The command builds a training configuration: it also takes train.py's overrides (`--data.source X`,
    `--learning_rate 1e-4`), as train.py does, with or without `--` before them (`main` sets them aside)."""
    parser.set_defaults(_train_overrides=[])
    parser.epilog = ("It also takes train.py's overrides, as train.py does (--data.source PATH, --training.seed 1, "
                     "...), with or without -- before them.")


def _split_train_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """(the command's own arguments, train.py's overrides): everything after `--`, and every `--option` that is
    train.py's and not the command's, with its value read as train.py reads it. An option that is neither is
    train.py's to refuse with its did-you-mean, unless it is a near miss of one of the command's own."""
    own = {flag for action in parser._actions for flag in action.option_strings}
    mine: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        token, name = argv[i], argv[i].split("=", 1)[0]
        if token == "--":
            overrides += argv[i + 1:]
            break
        if not token.startswith("--") or name in own:
            mine.append(token)
            i += 1
            continue
        if not is_train_option(name):
            close = difflib.get_close_matches(name, sorted(own), n=1, cutoff=0.8)
            if close:
                parser.error(f"unrecognized arguments: {token} (did you mean {close[0]}?)")
        takes_value = "=" not in token and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        overrides += argv[i:i + 1 + takes_value]
        i += 1 + takes_value
    return mine, overrides


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The training configuration of `--config` (or the defaults) with train.py's overrides applied, exactly as
    train.py builds it."""
    path, overrides = parse_overrides(args._train_overrides)
    return load_config(args.config or path, overrides)


def _add_policy_argument(parser: argparse.ArgumentParser) -> None:
    """`--policy POLICY`: a saved policy folder, a Hub model id or a W&B artifact reference (`--checkpoint` is its
    old name)."""
    # not required=True: argparse would then refuse the old spelling alone (`main` checks it is given)
    parser.add_argument("--policy", default=None, help="saved policy folder (e.g. OUTPUT_DIR/final), Hub model id or "
                                                       "W&B artifact wandb:ENTITY/PROJECT/NAME:ALIAS (required)")
    _renamed_flag(parser, "--checkpoint", "--policy")


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config RUN.yaml` (its `data:` section: the run's exact split) and the flags that override it."""
    parser.add_argument("--config", default=None,
                        help="a run's config.yaml (OUTPUT_DIR/config.yaml): use its data section, split included")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (Hub ids only)")
    parser.add_argument("--val-fraction", type=float, default=None, help="share of episodes held out (as in training)")
    parser.add_argument("--split-seed", type=int, default=None, help="seed of the episode split (as in training)")
    _takes_train_overrides(parser)


def _data_config(args: argparse.Namespace, source: str | list[str] | None) -> DataConfig:
    """The `data:` section of `--config` (or the defaults) and train.py's overrides, with `source` and the data
    flags applied on top."""
    config = _train_config(args).data
    named = "source" in parse_overrides(args._train_overrides)[1].get("data", {})  # as train.py's --data.source
    if args.config is None and source is None and not named:
        raise ValueError("name the data: a source (Hub dataset id or folder) or --config RUN.yaml")
    overrides = {"source": source, "revision": args.revision, "val_fraction": args.val_fraction,
                 "split_seed": args.split_seed}
    # these commands read every frame of the split once, in order: a stream would need its own length
    return replace(config, streaming=False, **{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------------------------
# data commands (data-info, convert-libero-hdf5, compute-stats, make-synthetic-libero)
# ----------------------------------------------------------------------------------------------


@_command("data-info", "Describe a LIBERO source: layout, episodes, frames, tasks, state/action dims, cameras, fps.")
def _add_data_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="+",
                        help="Hub dataset id, LeRobot v2/v3 folder, or save_to_disk folder; several: each, then their "
                             "union as one run would train on it")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (Hub ids only)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


@_add_data_info.runner
def _run_data_info(args: argparse.Namespace) -> int:
    import json

    from atlas_vla.data.sources import describe

    infos = [describe(source, revision=args.revision) for source in args.source]
    union = None
    if len(infos) > 1:  # tasks are keyed by instruction text across sources
        tasks = sorted({task for info in infos for task in info["tasks"]})
        union = {"sources": [info["source"] for info in infos], "tasks": tasks,
                 "num_episodes": sum(info["num_episodes"] for info in infos),
                 "num_frames": sum(info["num_frames"] for info in infos)}
    if args.json:
        print(json.dumps(infos[0] if union is None else {**union, "per_source": infos}))
        return 0
    for info in infos:
        _print_source(info)
    if union is not None:
        print(f"\nunion of {len(infos)} sources: {union['num_episodes']} episodes, {union['num_frames']} frames, "
              f"{len(union['tasks'])} tasks (by instruction)")
        for index, task in enumerate(union["tasks"]):
            print(f"  {index:>3}  {task}")
    return 0


def _print_source(info: dict[str, Any]) -> None:
    """The `data-info` table of one source."""
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
    from atlas_vla.data.sources import convert_libero_hdf5_to_dataset

    convert = convert_libero_hdf5 if args.format == "lerobot_v2" else convert_libero_hdf5_to_dataset
    path = convert(args.inputs, args.output, rotate=not args.no_rotate, image_size=args.image_size,
                   filter_noops=args.filter_noops, fps=args.fps, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


@_command("generate-demos", "Generate demonstrations in new layouts from recorded LIBERO ones (kept when the simulator "
                            "confirms success).")
def _add_generate_demos(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", action="append", required=True, metavar="DEMOS",
                        help="recorded episodes: a LeRobot folder or Hub dataset data.source reads (repeatable)")
    parser.add_argument("--output", required=True, help="the LeRobot folder to write (its tries are kept beside it, "
                                                        "in OUTPUT.generation/, so a rerun continues)")
    parser.add_argument("--num-demos", type=int, required=True, help="episodes to keep per task")
    parser.add_argument("--seed", type=int, default=0, help="decides every layout (evaluation's layouts never repeat "
                                                            "them, whatever its seed)")
    parser.add_argument("--num-workers", type=int, default=1, help="simulator worker processes")
    parser.add_argument("--other-goals", action="store_true",
                        help="also move the other objects of the goal's kind (the other black bowl), named by where "
                             "they are")
    parser.add_argument("--fresh", action="store_true", help="discard the tries of an earlier run and start over")


@_add_generate_demos.runner
def _run_generate_demos(args: argparse.Namespace) -> int:
    from atlas_vla.generation.generate import REPORT_NAME, generate_demos

    report = generate_demos(args.source, args.output, num_demos=args.num_demos, seed=args.seed,
                            num_workers=args.num_workers, other_goals=args.other_goals, fresh=args.fresh)
    for task, row in report["tasks"].items():
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(row["rejected"].items())) or "none"
        print(f"{task}: {row['used']} episodes written; kept {row['kept']} / tried {row['tries']} (rejected: {reasons})")
    print(f"wrote {args.output} ({REPORT_NAME} holds the report)")
    return 0


@_command("render-scenes", "Render first frames of recorded LIBERO tasks' scenes in new layouts, with where the goal's "
                           "object and its target rest (data for the locate query; no actions).")
def _add_render_scenes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", action="append", required=True, metavar="DEMOS",
                        help="recorded episodes (a LeRobot folder or Hub dataset data.source reads; repeatable): their "
                             "tasks, instructions and image format")
    parser.add_argument("--output", required=True, help="the LeRobot folder to write (its scenes are kept beside it, "
                                                        "in OUTPUT.scenes/, so a rerun continues)")
    parser.add_argument("--num-scenes", type=int, required=True, help="scenes per task")
    parser.add_argument("--seed", type=int, default=0, help="decides every layout (neither generate-demos nor the "
                                                            "evaluation draws them, whatever their seeds)")
    parser.add_argument("--initial-states", default="0-19",
                        help="the official initial states the scenes start from, e.g. 0-19 or 0,2,5 (default 0-19: "
                             "those the shared recordings start from)")
    parser.add_argument("--num-workers", type=int, default=1, help="simulator worker processes")
    parser.add_argument("--no-other-goals", dest="other_goals", action="store_false",
                        help="name only the task's own goal object (by default the other objects of its kind are "
                             "goals too, in turn, each named by where it is)")
    parser.add_argument("--fresh", action="store_true", help="discard the scenes of an earlier run and start over")


@_add_render_scenes.runner
def _run_render_scenes(args: argparse.Namespace) -> int:
    from atlas_vla.eval.libero_sim import parse_range
    from atlas_vla.generation.scenes import REPORT_NAME, render_scenes

    report = render_scenes(args.source, args.output, num_scenes=args.num_scenes, seed=args.seed,
                           num_workers=args.num_workers, other_goals=args.other_goals,
                           initial_states=parse_range(args.initial_states), fresh=args.fresh)
    for task, row in report["tasks"].items():
        print(f"{task}: {row['kept']} of {row['scenes']} scenes written ({row['no_layout']} without a usable layout)")
    print(f"wrote {args.output} ({REPORT_NAME} holds the report)")
    return 0


@_command("compute-stats", "Compute action/state normalisation statistics of a LIBERO source's training split.")
def _add_compute_stats(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="*", default=None,
                        help="Hub dataset id, LeRobot v2/v3 folder, or save_to_disk folder; several are one union "
                             "(default: --config's)")
    parser.add_argument("--output", required=True, help="statistics JSON file to write")
    _add_data_arguments(parser)


@_add_compute_stats.runner
def _run_compute_stats(args: argparse.Namespace) -> int:
    from atlas_vla.data.normalization import compute_norm_stats
    from atlas_vla.data.split import load_train_val

    config = _data_config(args, args.source or None)
    train, _ = load_train_val(config)
    stats = compute_norm_stats(train, config.sources)
    path = stats.save(args.output)
    print(f"wrote {path}: {stats.num_frames} frames, fingerprint {stats.fingerprint}")
    return 0


@_command("cache-features", "Build a run's frozen-feature store (the VGGT pass training.feature_store reuses) "
                            "without training; under accelerate launch every process encodes its share.")
def _add_cache_features(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run's YAML config (or a run's OUTPUT_DIR/config.yaml)")
    parser.add_argument("--output", default=None,
                        help="the store's folder (default: the config's training.feature_store, else auto: "
                             "<output_dir>/../feature_stores/<key>)")
    _takes_train_overrides(parser)


@_add_cache_features.runner
def _run_cache_features(args: argparse.Namespace) -> int:
    from atlas_vla.training.train import cache_features

    path = cache_features(_train_config(args), args.output)
    print(f"feature store ready: {path}")
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
    _add_policy_argument(parser)
    parser.add_argument("--observation", required=True,
                        help=".npz with agentview_image, wrist_image (upright HWC uint8), state (8,), task_description")
    parser.add_argument("--json", action="store_true", help='print {"actions": [[7 floats], ...]}')


@_add_predict.runner
def _run_predict(args: argparse.Namespace) -> int:
    import json
    import zipfile

    import numpy as np

    from atlas_vla.constants import OBSERVATION_KEYS
    from atlas_vla.models.policy import AtlasPolicy

    path = Path(args.observation)
    if not path.is_file():
        raise FileNotFoundError(f"observation file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz file (a NumPy archive written by np.savez) with the keys "
                         f"{list(OBSERVATION_KEYS)}")
    with np.load(path, allow_pickle=False) as data:  # never unpickle a file we were handed
        missing = [key for key in OBSERVATION_KEYS if key not in data.files]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}; expected {list(OBSERVATION_KEYS)}, found {data.files}")
        observation = {}
        for key in OBSERVATION_KEYS:
            try:
                observation[key] = data[key]
            except ValueError:  # an object array: numpy would only load it by unpickling
                raise ValueError(f"{path}: key {key!r} holds pickled Python objects, which are never loaded; store "
                                 f"a plain array (text as np.str_)") from None
    observation["task_description"] = str(observation["task_description"])
    actions = AtlasPolicy.from_pretrained(args.policy).predict_action(observation)
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
    _add_policy_argument(parser)
    parser.add_argument("--data", default=None,
                        help="Hub dataset id, LeRobot v2/v3 folder, or save_to_disk folder (default: --config's)")
    parser.add_argument("--split", choices=("val", "train", "all"), default="val", help="episode split to score")
    _add_data_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batches", type=int, default=None,
                        help="score this many batches, of samples spread over the whole split")
    parser.add_argument("--output", default=None, help="also write the metrics as JSON here")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


@_add_eval_offline.runner
def _run_eval_offline(args: argparse.Namespace) -> int:
    import json

    from atlas_vla.eval.offline import evaluate_offline, save_metrics

    metrics = evaluate_offline(args.policy, _data_config(args, args.data), split=args.split,
                               batch_size=args.batch_size, max_batches=args.max_batches)
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
    _add_policy_argument(parser)
    parser.add_argument("--config", default=None,
                        help="a run's config (YAML): evaluate with its eval section (a config without one gets the "
                             "eval defaults: 5 initial states, 2 workers); the flags below override it")
    _add_episode_flags(parser)
    _takes_train_overrides(parser)
    parser.add_argument("--video-dir", default=None, help="write one mp4 per episode here")
    parser.add_argument("--server", default=None, metavar="ws://HOST:PORT",
                        help="a running `atlas-vla serve`: the workers query it instead of loading --policy")
    parser.add_argument("--api-key", default=None,
                        help=f"the --server's API key (default: the {API_KEY_ENV} environment variable)")
    parser.add_argument("--episode-timeout", type=float, default=900.0, help="seconds before a hung episode is killed")
    parser.add_argument("--output", default="eval_results.json",
                        help="results JSON file (default: eval_results.json in the working directory); finished "
                             "episodes are logged beside it (RESULTS.episodes.jsonl) and a rerun continues from them")
    parser.add_argument("--fresh", action="store_true", help="start over: discard the episode log of an earlier run")
    parser.add_argument("--report-to", choices=("none", "wandb"), default="none", help="also log to W&B")
    _renamed_flag(parser, "--report_to", "--report-to", choices=("none", "wandb"))


def _add_episode_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that choose an evaluation's episodes and how chunks run (they override an `eval:` section)."""
    parser.add_argument("--suite", default=None,
                        help="any suite the installed simulator can run: libero_spatial, libero_object, libero_goal, "
                             "libero_10, libero_90, or a LIBERO-PRO variant such as libero_spatial_swap (required "
                             "unless --config gives it)")
    parser.add_argument("--perturbations", default=None, metavar="swap,object,lan,task",
                        help="also run these LIBERO-PRO variants of --suite on the same tasks and initial states, "
                             "and print one table (rows: suites; columns: tasks and average)")
    parser.add_argument("--tasks", default=None, help="task ids, e.g. 0,3 or 0-4 (default: every task of the suite)")
    parser.add_argument("--trials", type=int, default=None,
                        help="episodes per task: initial states 0..trials-1 (default 50, or --config's states)")
    parser.add_argument("--initial-states", default=None, help="explicit initial states, e.g. 30-49 (overrides --trials)")
    parser.add_argument("--max-episode-steps", type=int, default=None,
                        help="policy steps per episode (default: the suite's)")
    parser.add_argument("--replan-steps", type=int, default=None,
                        help="actions executed per query (default: the policy's whole chunk)")
    parser.add_argument("--ensemble-decay", type=float, default=None, metavar="DECAY",
                        help="query every step and average overlapping chunks, weights exp(-DECAY * i) from the "
                             "oldest (ACT; e.g. 0.1); replaces --replan-steps")
    parser.add_argument("--camera-size", type=int, default=None, help="simulator camera resolution (protocol: 256)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="parallel simulator worker processes (default 1); without --server they share one policy "
                             "server started for the evaluation, which batches their queries")
    parser.add_argument("--seed", type=int, default=None, help="env.seed of every episode (default 0)")
    parser.add_argument("--layouts", choices=("official", "random"), default=None,
                        help="random: lay each episode's objects out anew with generate-demos' sampler (from a seed "
                             "stream of its own, so never a layout any generation drew) and name the goal's object "
                             "where it now is (default: official, the initial states as they are)")
    parser.add_argument("--layout-seed", type=int, default=None, help="the seed of --layouts random (default 0)")
    _renamed_flag(parser, "--max-steps", "--max-episode-steps", type=int)
    _renamed_flag(parser, "--temporal-ensemble", "--ensemble-decay", type=float)


def _eval_config(args: argparse.Namespace) -> EvalConfig:
    """The `eval:` section of `--config` (or the command's defaults) with the given flags applied on top."""
    from atlas_vla.eval.libero_sim import parse_range

    if args.config is None and args.suite is None:
        raise ValueError("--suite is required without --config RUN.yaml")
    config = (_train_config(args).eval if args.config or args._train_overrides
              else EvalConfig(initial_states=list(range(50)), num_workers=1))
    overrides = {"suite": args.suite, "max_episode_steps": args.max_episode_steps, "replan_steps": args.replan_steps,
                 "ensemble_decay": args.ensemble_decay, "camera_size": args.camera_size,
                 "num_workers": args.num_workers, "seed": args.seed, "layouts": args.layouts,
                 "layout_seed": args.layout_seed,
                 "tasks": parse_range(args.tasks) if args.tasks else None,
                 "perturbations": [p.strip() for p in args.perturbations.split(",") if p.strip()]
                 if args.perturbations else None,
                 # eval-libero: videos exactly when a folder is given; eval-watch: as the run's config says
                 "videos": args.video_dir is not None if hasattr(args, "video_dir") else None}
    if args.initial_states:
        overrides["initial_states"] = parse_range(args.initial_states)
    elif args.trials is not None:
        overrides["initial_states"] = list(range(args.trials))
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def _policy_identity(policy: str | None, server: str | None) -> str:
    """What an evaluation records of the policy it ran: the hash of its saved files, or the server it asked."""
    from atlas_vla.models.pretrained import policy_hash

    return f"server {server}" if policy is None else f"sha256 {policy_hash(policy)}"


@_add_eval_libero.runner
def _run_eval_libero(args: argparse.Namespace) -> int:
    from atlas_vla.eval import libero_sim as sim
    from atlas_vla.eval.episode_log import EpisodeLog, episode_key, identity, log_path

    try:
        sim.require_simulator()
    except sim.SimulatorMissing as error:
        print(f"atlas-vla eval-libero: {error}", file=sys.stderr)
        return 2
    config = _eval_config(args)
    specs = sim.episode_specs(config, video_dir=args.video_dir)  # checks tasks and states before any worker starts
    policy = sim.resolve_policy(args.policy) if args.server is None else None

    def report(result: "sim.EpisodeResult") -> None:
        status = "error" if result.error else ("success" if result.success else "failure")
        print(f"task {result.task_id} init {result.initial_state}: {status} after {result.steps} steps "
              f"({result.seconds:.1f} s)" + (f": {result.error.splitlines()[0]}" if result.error else ""), flush=True)

    start = time.perf_counter()
    if args.fresh:
        log_path(args.output).unlink(missing_ok=True)
    policy_identity = _policy_identity(policy, args.server)
    log = EpisodeLog(log_path(args.output), identity(policy_identity, to_dict(config)))
    remaining, earlier = log.remaining(specs), list(log.finished.values())
    if earlier:
        print(f"continuing the evaluation in {log.path}: {len(specs) - len(remaining)} of {len(specs)} episodes "
              f"are done", flush=True)

    def record(result: "sim.EpisodeResult") -> None:
        log.append(result)
        report(result)

    fresh = sim.evaluate(policy, remaining, num_workers=config.num_workers, server=args.server,
                         api_key=args.api_key or os.environ.get(API_KEY_ENV), episode_timeout=args.episode_timeout,
                         on_result=record) if remaining else []
    results = sorted([*earlier, *fresh], key=episode_key)
    summary = sim.summarize(results)
    settings = {**{k: v for k, v in vars(args).items() if not k.startswith("_") and k != "api_key"},
                "eval": to_dict(config), "policy_folder": policy, "policy_identity": policy_identity,
                "seconds": time.perf_counter() - start}
    for suite, suite_summary in summary["suites"].items():
        print(sim.format_table(suite, suite_summary))
    if len(summary["suites"]) > 1:
        print(sim.format_comparison(list(summary["suites"].items())))
    if config.layouts == "random":
        print(f"layouts: random, layout seed {config.layout_seed} (the evaluation's own seed stream: no generate-demos "
              f"run drew these); each episode's layout and instruction are in the results")
    path = sim.save_results(args.output, config.suite, summary, settings)
    print(f"wrote {path}")
    check_episodes_ran(results, path)
    if args.report_to == "wandb":
        print(f"logged to W&B run {sim.log_to_wandb(config.suite, summary, settings)}")
    return 0


# ----------------------------------------------------------------------------------------------
# serving
# ----------------------------------------------------------------------------------------------

@_command("serve", "Serve a policy over a websocket (openpi's protocol): robots, simulators and eval workers query it.")
def _add_serve(parser: argparse.ArgumentParser) -> None:
    _add_policy_argument(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (0: a free one, printed on start)")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="requests batched into one forward pass at most (1: no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long a batch waits for more requests after its first one")
    parser.add_argument("--api-key", default=None,
                        help=f"refuse connections without 'Authorization: Api-Key KEY' (default: the {API_KEY_ENV} "
                             "environment variable; prefer it, a flag is visible to other users in `ps`)")
    parser.add_argument("--device", default=None, help="torch device for the model (default: cuda if available)")


@_add_serve.runner
def _run_serve(args: argparse.Namespace) -> int:
    import logging

    import torch

    from atlas_vla.models.policy import AtlasPolicy
    from atlas_vla.serving.server import PolicyServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy = AtlasPolicy.from_pretrained(args.policy).to(device)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    server = PolicyServer(policy, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                          max_wait_ms=args.max_wait_ms, api_key=api_key)

    def ready(port: int) -> None:
        print(f"atlas-vla serve: {args.policy} on ws://{args.host}:{port} (health: http://{args.host}:{port}/healthz; "
              f"{'API key required' if api_key else 'no API key'}); Ctrl-C stops", flush=True)

    server.run(ready)
    return 0


@_command("eval-watch", "Evaluate every checkpoint of a training run in the simulator as it appears (a separate job).")
def _add_eval_watch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", help="the training run's output folder (its config.yaml gives the eval section)")
    _add_episode_flags(parser)
    _takes_train_overrides(parser)
    parser.add_argument("--once", action="store_true", help="evaluate the checkpoints there now, then exit")
    parser.add_argument("--poll-seconds", type=float, default=30.0, help="how often to look for new checkpoints")
    parser.add_argument("--report-to", choices=("none", "wandb"), default=None,
                        help="log to W&B beside the training run (default: wandb when the run logs to W&B)")


@_add_eval_watch.runner
def _run_eval_watch(args: argparse.Namespace) -> int:
    import logging

    from atlas_vla.eval.libero_sim import require_simulator
    from atlas_vla.training.watch import EvalWatcher

    require_simulator()  # a ValueError naming the extra: main prints it and exits with 2
    output_dir = Path(args.output_dir)
    args.config = output_dir / "config.yaml"
    if not args.config.is_file() and args.once:
        raise FileNotFoundError(f"{args.config} not found: {output_dir} is not a training run's output folder "
                                f"(training writes config.yaml there first)")
    if not args.config.is_file():  # started beside a training run that has not written its folder yet
        print(f"atlas-vla eval-watch: waiting for {args.config}", flush=True)
        while not args.config.is_file():
            time.sleep(args.poll_seconds)
    report_to = args.report_to or ("wandb" if "wandb" in load_config(args.config).trackers else "none")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    watcher = EvalWatcher(output_dir, _eval_config(args), report_to=report_to, poll_seconds=args.poll_seconds)
    evaluated = watcher.run(once=args.once)
    print(f"atlas-vla eval-watch: evaluated {evaluated} checkpoint(s) of {output_dir}")
    return 0


@_command("eval-report", "Compare eval-libero results files: one row per file and suite, a column per task.")
def _add_eval_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", help="eval_results.json files (e.g. two checkpoints, base vs perturbed)")


@_add_eval_report.runner
def _run_eval_report(args: argparse.Namespace) -> int:
    from atlas_vla.eval import libero_sim as sim

    rows = []
    for path in args.results:
        results = sim.load_results(path)
        label = path if len(args.results) > 1 else ""
        rows += [(f"{label} {suite}".strip(), summary) for suite, summary in results["suites"].items()]
    print(sim.format_comparison(rows))
    return 0


@_command("model-card", "Write README.md into a saved policy folder: what it is, its training, its closed-loop "
                        "results (Hub metadata with a model-index).")
def _add_model_card(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("policy_dir", metavar="POLICY", help="saved policy folder (e.g. OUTPUT_DIR/final)")
    parser.add_argument("--repo-id", default=None, help="the Hub repo the card's usage snippet loads from")
    _add_card_arguments(parser)


def _add_card_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval", dest="results", nargs="+", default=[], metavar="RESULTS",
                        help="eval-libero results files: one model-index result per suite evaluated")
    parser.add_argument("--license", default=None, help="the card's license (default: cc-by-nc-4.0 for a policy on "
                                                        "facebook/VGGT-1B, whose weights are non-commercial; else "
                                                        "apache-2.0)")


@_add_model_card.runner
def _run_model_card(args: argparse.Namespace) -> int:
    from atlas_vla.training.model_card import write_model_card

    print(f"wrote {write_model_card(args.policy_dir, args.results, license=args.license, repo_id=args.repo_id)}")
    return 0


@_command("push", "Upload a saved policy folder to the Hugging Face Hub with its model card (written first when "
                  "--eval is given or the folder has none); needs `huggingface-cli login` or HF_TOKEN.")
def _add_push(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("policy_dir", metavar="POLICY", help="saved policy folder (e.g. OUTPUT_DIR/final)")
    parser.add_argument("--repo-id", required=True, help="the Hub model repo, e.g. my-team/atlas-libero-spatial")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    _add_card_arguments(parser)


@_add_push.runner
def _run_push(args: argparse.Namespace) -> int:
    from atlas_vla.models.pretrained import push_policy_folder
    from atlas_vla.training.model_card import CARD_NAME, write_model_card

    if args.results or not (Path(args.policy_dir) / CARD_NAME).is_file():
        write_model_card(args.policy_dir, args.results, license=args.license, repo_id=args.repo_id)
    print(f"uploaded {args.policy_dir} to {push_policy_folder(args.policy_dir, args.repo_id, private=args.private)}")
    return 0


# argument names that hold local paths, and those that hold a local path or a Hub id
_PATH_ARGUMENTS = ("config", "output", "output_dir", "video_dir", "observation", "inputs", "policy_dir", "results")
_PATH_OR_HUB_ARGUMENTS = ("policy", "data", "source")


def _resolve_paths(args: argparse.Namespace) -> None:
    """Every path a command was given, absolute against the working directory it was started in, once, as it is
    read (`hub.resolve_local`: a Hub id stays as it is): what the command reads and writes, and what it records."""
    for name in _PATH_ARGUMENTS + _PATH_OR_HUB_ARGUMENTS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "policy":
            check_reference(value, "--policy")  # a malformed W&B reference is refused before it reads anything
        resolve = resolve_local if name in _PATH_OR_HUB_ARGUMENTS else absolute_path
        setattr(args, name, [resolve(str(v)) for v in value] if isinstance(value, list) else resolve(str(value)))


def _subcommand(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser | None:
    """The subcommand parser `argv` names (its first word), or None."""
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices.get(argv[0]) if argv else None


def build_parser() -> argparse.ArgumentParser:
    """The `atlas-vla` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="atlas-vla", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help, add_arguments, run in _COMMANDS:
        sub = subparsers.add_parser(name, help=help, description=help)
        add_arguments(sub)
        sub.set_defaults(_run=run)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """`atlas-vla` arguments as its commands read them: train.py's overrides set aside (`_train_overrides`) for
    the commands that build a training configuration, and every path absolute. A usage error exits 2 (argparse);
    an option that neither the command nor train.py has is a `ValueError` with train.py's did-you-mean."""
    parser = build_parser()
    argv = list(argv)
    command = _subcommand(parser, argv)
    overrides: list[str] = []
    if command is not None and command.get_default("_train_overrides") is not None:
        own, overrides = _split_train_overrides(command, argv[1:])
        argv = argv[:1] + own
    args = parser.parse_args(argv)
    if overrides:
        parse_overrides(overrides)  # an option train.py does not have: a ValueError with its did-you-mean, now
        args._train_overrides = overrides
    _resolve_paths(args)
    if getattr(args, "policy", "") is None and getattr(args, "server", None) is None:
        parser.error(f"{args.command}: the argument --policy is required")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `atlas-vla` console script."""
    print_renames_as_one_line()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except ValueError as error:
        print(f"atlas-vla {argv[0]}: error: {error}", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, ConnectionError, EvaluationFailed) as error:
        print(f"atlas-vla {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
