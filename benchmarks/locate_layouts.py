"""Where a policy's locate query (`model.locate_weight`) puts the goal's object and its target, against the
simulator's poses, at the first frame of evaluation episodes: on the initial states as they are, and on the same
states laid out anew (`--layouts random`, the evaluation's own seed stream). It tells "does not find the objects"
apart from "finds them and does not act on it", in a few seconds per episode and without a rollout.

    MUJOCO_GL=egl python benchmarks/locate_layouts.py --policy outputs/layouts_F/final \
        --config configs/sim_layouts.yaml --tasks 0,1,2,3,7 --initial-states 20-29 --layout-seed 1
    python benchmarks/locate_layouts.py --run outputs/layouts_F --no-simulator   # the run's own episodes only

Per episode and in summary: the mean absolute error per coordinate (metres) of the object and the target, and, for
the new layouts, the same error measured against where the initial state had them. A locator that replays layouts
is closer to the old positions than to the new ones. With `--run` (a training output folder), also the first frame
of every episode of its data that knows the positions (generated ones), training and validation split apart, beside
the error of the best constant guess (each split's mean position): whether the query finds things at an episode's
start even in the episodes it trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")


def truth(env: Any) -> np.ndarray:
    """Where the scene's goal object and its target are now: (2, 3) world xyz."""
    from atlas_vla.scenes.scene import Scene

    scene = Scene(env)
    goal = scene.goal()
    return np.array([scene.pose(goal.obj).position, scene.pose(goal.target).position])


def explained(inputs: np.ndarray, targets: np.ndarray) -> float:
    """The share of the targets' variance (N, k) that a least-squares affine map of the inputs (N, d) explains,
    averaged over the target columns (R^2 on the fitted episodes themselves)."""
    design = np.c_[inputs, np.ones(len(inputs))]
    residual = targets - design @ np.linalg.lstsq(design, targets, rcond=None)[0]
    return round(float(np.mean(1 - residual.var(axis=0) / targets.var(axis=0))), 3)


def first_frames(policy: Any, run: Path) -> dict[str, dict[str, Any]]:
    """The locate error at the first frame of each episode of the run's data that knows `OBJECT_POSITIONS`, per
    split, with the best constant guess's (the split's mean position) beside it; for a spatial read-out, also how
    peaked its attention is and how far its image positions move from episode to episode."""
    import torch
    from atlas_vla.config import load_config
    from atlas_vla.constants import (AGENT_IMAGE, FRAME_INDEX, INSTRUCTION, OBJECT_POSITIONS, STATE, WRIST_IMAGE)
    from atlas_vla.data.split import load_train_val

    from atlas_vla.models.locator import SpatialLocator

    inputs: list[tuple[Any, ...]] = []  # what the locator read: (feature, patches)
    if isinstance(policy.locator, SpatialLocator):
        policy.locator.register_forward_pre_hook(lambda module, args: inputs.append(args))
    result = {}
    for split, table in zip(("train", "validation"), load_train_val(load_config(run / "config.yaml").data)):
        if OBJECT_POSITIONS not in table.column_names:
            raise ValueError(f"{run}: its data has no {OBJECT_POSITIONS} (no generated source)")
        known = np.isfinite(np.asarray(table[OBJECT_POSITIONS], dtype=np.float64)).all(axis=1)
        rows = np.flatnonzero((np.asarray(table[FRAME_INDEX]) == 0) & known).tolist()
        located, truths = [], []
        for row in table.select(rows):
            observation = {"agentview_image": np.asarray(row[AGENT_IMAGE]), "wrist_image": np.asarray(row[WRIST_IMAGE]),
                           "state": np.asarray(row[STATE], np.float32), "task_description": row[INSTRUCTION]}
            located.append(policy.locate(observation))
            truths.append(np.asarray(row[OBJECT_POSITIONS], np.float64).reshape(2, 3))
        located, truths = np.array(located), np.array(truths)
        constant = np.abs(truths - truths.mean(axis=0)).mean(axis=(0, 2))
        result[split] = {"episodes": len(rows), "error_m": np.abs(located - truths).mean(axis=(0, 2)).round(4).tolist(),
                         "constant_guess_error_m": constant.round(4).tolist()}
        print(f"{split}: first frames of {len(rows)} episodes, error (object, target) {result[split]['error_m']} m, "
              f"the split's mean position {result[split]['constant_guess_error_m']} m", flush=True)
        if inputs:  # does the attention pick patches, and do the image positions follow the layouts?
            with torch.no_grad():
                weights = torch.cat([policy.locator.attention(*args) for args in inputs[-len(rows):]])
            weights = weights.double().numpy()
            where = weights @ policy.locator.centres.double().numpy()  # (episodes, things, 2)
            result[split]["attention_peak"] = weights.max(axis=2).mean(axis=0).round(3).tolist()
            result[split]["image_position_spread"] = where.std(axis=0).mean(axis=1).round(3).tolist()
            result[split]["image_position_r2"] = ([explained(where[:, k], truths[:, k, :2]) for k in range(2)]
                                                  if len(rows) >= 10 else None)  # a fit to a handful says nothing
            print(f"  spatial read-out: mean largest attention weight (object, target) "
                  f"{result[split]['attention_peak']} (uniform: {1 / weights.shape[2]:.3f}); spread of the image "
                  f"positions over the episodes {result[split]['image_position_spread']} (of -1..1); share of the "
                  f"table positions' variance a linear map of them explains {result[split]['image_position_r2']}",
                  flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", help="a saved policy with a locate query (default: <run>/final)")
    parser.add_argument("--run", help="a training output folder: also its own episodes' first frames")
    parser.add_argument("--no-simulator", action="store_true", help="only the run's episodes")
    parser.add_argument("--config", default="configs/sim_layouts.yaml", help="its eval: section sets the cameras")
    parser.add_argument("--tasks", default="0,1,2,3,7")
    parser.add_argument("--initial-states", default="20-29")
    parser.add_argument("--layout-seed", type=int, default=1)
    parser.add_argument("--output", default=None, help="a JSON file for the per-episode rows and the summary")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as in an evaluation worker
    from atlas_vla.config import load_config
    from atlas_vla.eval import libero_sim as sim
    from atlas_vla.models.policy import AtlasPolicy

    if not (args.policy or args.run):
        parser.error("give --policy, --run or both")
    if args.no_simulator and not args.run:
        parser.error("--no-simulator measures a run's own episodes: give --run")
    policy = AtlasPolicy.from_pretrained(args.policy or Path(args.run) / "final")
    report: dict[str, Any] = {"settings": vars(args)}
    if args.run:
        report["first_frames"] = first_frames(policy, Path(args.run))
    if args.no_simulator:
        if args.output:
            Path(args.output).write_text(json.dumps(report, indent=1))
        return
    config = dataclasses.replace(load_config(args.config).eval, tasks=sim.parse_range(args.tasks),
                                 initial_states=sim.parse_range(args.initial_states), layouts="random",
                                 layout_seed=args.layout_seed, perturbations=[], videos=False)
    rows, env, env_task = [], None, None
    for spec in sim.episode_specs(config):
        instruction, bddl, init_states = sim.task_info(spec.suite, spec.task_id)
        if env_task != spec.task_id:
            if env is not None:
                env.close()
            env, env_task = sim.make_env(bddl, spec.camera_size), spec.task_id
        init_state = init_states[spec.initial_state]
        obs = sim.start_episode(env, init_state, spec.seed)
        before = truth(env)
        base = policy.locate(sim.sim_observation(obs, instruction))
        obs, words, _ = sim.random_layout(env, spec, init_state, instruction)
        after = truth(env)
        moved = policy.locate(sim.sim_observation(obs, words))
        rows.append({"task": spec.task_id, "initial_state": spec.initial_state, "instruction": words,
                     "base_error_m": np.abs(base - before).mean(axis=1).tolist(),
                     "random_error_m": np.abs(moved - after).mean(axis=1).tolist(),
                     "random_error_to_old_positions_m": np.abs(moved - before).mean(axis=1).tolist(),
                     "moved_m": np.linalg.norm(after - before, axis=1).tolist()})
        row = {key: " ".join(f"{value:.3f}" for value in values) for key, values in rows[-1].items()
               if key.endswith("_m")}
        print(f"task {spec.task_id} state {spec.initial_state}: error (object, target) base {row['base_error_m']} m, "
              f"random {row['random_error_m']} m (to the old positions {row['random_error_to_old_positions_m']}; "
              f"moved {row['moved_m']} m)", flush=True)
    if env is not None:
        env.close()
    summary = {key: np.mean([row[key] for row in rows], axis=0).round(4).tolist()
               for key in ("base_error_m", "random_error_m", "random_error_to_old_positions_m", "moved_m")}
    print("mean (object, target):", json.dumps(summary))
    if args.output:
        Path(args.output).write_text(json.dumps({**report, "summary": summary, "episodes": rows}, indent=1))


if __name__ == "__main__":
    main()
