"""Where a policy's locate query (`model.locate_weight`) puts the goal's object and its target, against the
simulator's poses, at the first frame of evaluation episodes: on the initial states as they are, and on the same
states laid out anew (`--layouts random`, the evaluation's own seed stream). It tells "does not find the objects"
apart from "finds them and does not act on it", in a few seconds per episode and without a rollout.

    MUJOCO_GL=egl python benchmarks/locate_layouts.py --policy outputs/layouts_F/final \
        --config configs/sim_layouts.yaml --tasks 0,1,2,3,7 --initial-states 20-29 --layout-seed 1

Per episode and in summary: the mean absolute error per coordinate (metres) of the object and the target, and, for
the new layouts, the same error measured against where the initial state had them. A locator that replays layouts
is closer to the old positions than to the new ones.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="a saved policy with a locate query")
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

    policy = AtlasPolicy.from_pretrained(args.policy)
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
        print(f"task {spec.task_id} state {spec.initial_state}: error (object, target) base "
              f"{rows[-1]['base_error_m'][0]:.3f} {rows[-1]['base_error_m'][1]:.3f} m, random "
              f"{rows[-1]['random_error_m'][0]:.3f} {rows[-1]['random_error_m'][1]:.3f} m (to the old positions "
              f"{rows[-1]['random_error_to_old_positions_m'][0]:.3f} {rows[-1]['random_error_to_old_positions_m'][1]:.3f}"
              f"; moved {rows[-1]['moved_m'][0]:.2f} {rows[-1]['moved_m'][1]:.2f} m)", flush=True)
    if env is not None:
        env.close()
    summary = {key: np.mean([row[key] for row in rows], axis=0).round(4).tolist()
               for key in ("base_error_m", "random_error_m", "random_error_to_old_positions_m", "moved_m")}
    print("mean (object, target):", json.dumps(summary))
    if args.output:
        Path(args.output).write_text(json.dumps({"settings": vars(args), "summary": summary, "episodes": rows},
                                                indent=1))


if __name__ == "__main__":
    main()
