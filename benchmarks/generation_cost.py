"""What generate-demos and eval-libero cost per simulator step, against the bare simulator stepping the same actions.

    MUJOCO_GL=egl python benchmarks/generation_cost.py --source PATH/TO/sim_demos --tries 6 \
        [--policy-config configs/sim_demos.yaml] [--episodes 2]

Generation: one worker's tries of the source's first task, in this process (`generate.run_try`, as a worker runs
them), each timed whole (reset, layouts, re-targeting, recording, the episode file) and counted in simulator steps
(every `env.step`: settling included); the one-time recovery of the source episode (its replay) is reported apart,
as are rejected tries. The bare cost is the same environment stepping the kept tries' recorded actions from their
laid-out scenes, timing `env.step` alone. eval-libero: episodes of an untrained policy of `--policy-config` (the
same network and query cost as a trained one) on its policy server, from `EpisodeResult.seconds` (the first
episode, which builds the environment, left out), against `env.step` of the same camera size. Run on a quiet
machine: the ratios are what the issue's speed goal (at most 1.25x) is judged on.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")


def _counted(env) -> list[int]:
    """Count `env.step` calls (the benchmark's own instrument: the environment is otherwise untouched)."""
    calls = [0]
    step = env.step

    def counting(action):
        calls[0] += 1
        return step(action)

    env.step = counting
    return calls


def bare_step_seconds(generator, episode, recovered, layout_record, actions) -> float:
    """Seconds per `env.step` of `actions` from the laid-out scene of a kept try."""
    from atlas_vla.scenes.layouts import Layout

    generator.lay_out(episode, recovered, Layout.from_record(layout_record))
    start = time.perf_counter()
    for action in actions:
        generator.env.step(action.tolist())
    return (time.perf_counter() - start) / len(actions)


def generation(source: str, tries: int, seed: int) -> dict:
    import numpy as np

    from atlas_vla.generation import generate
    from atlas_vla.generation.sources import read_episodes

    episode = read_episodes(source)[0]
    generator = generate.generator_for(episode.suite, episode.task_id, episode.image_size)
    calls = _counted(generator.env)
    start = time.perf_counter()
    recovered = generator.recover(episode)
    recovery = {"seconds": time.perf_counter() - start, "steps": calls[0]}
    kept, rejected = [], []
    with tempfile.TemporaryDirectory() as work:
        for number in range(tries):
            calls[0] = 0
            item = generate.Try(f"{episode.suite}/{episode.task_id}", number, episode, None, seed, recovered, work)
            start = time.perf_counter()
            record = generate.run_try(item)
            row = {"seconds": time.perf_counter() - start, "env_steps": calls[0], "episode_steps": record["steps"],
                   "reason": record["reason"]}
            if record["kept"]:
                with np.load(Path(work) / record["file"]) as arrays:
                    row["bare_step_seconds"] = bare_step_seconds(generator, episode, recovered, record["layout"],
                                                                 arrays["actions"])
                kept.append(row)
            else:
                rejected.append(row)
    generator.close()
    bare = float(np.mean([row["bare_step_seconds"] for row in kept])) if kept else None
    per_step = sum(r["seconds"] for r in kept) / max(1, sum(r["env_steps"] for r in kept))
    per_episode_step = sum(r["seconds"] for r in kept) / max(1, sum(r["episode_steps"] for r in kept))
    return {"task": f"{episode.suite}/{episode.task_id}", "recovery": recovery, "kept": kept, "rejected": rejected,
            "bare_step_seconds": bare, "seconds_per_env_step": per_step,
            "seconds_per_kept_episode_step": per_episode_step,
            "ratio_per_env_step": per_step / bare if bare else None,
            "ratio_per_kept_episode_step": per_episode_step / bare if bare else None,
            "demos_per_hour": len(kept) / (sum(r["seconds"] for r in kept + rejected) + recovery["seconds"]) * 3600}


def evaluation(source: str, policy_config: str, episodes: int, camera_size: int) -> dict:
    import torch

    from atlas_vla.config import load_config
    from atlas_vla.data.normalization import compute_norm_stats
    from atlas_vla.data.sources import load_libero
    from atlas_vla.eval import libero_sim as sim
    from atlas_vla.eval.config import EvalConfig
    from atlas_vla.models.policy import AtlasPolicy

    torch.set_num_threads(1)
    config = load_config(policy_config)
    stats = compute_norm_stats(load_libero(source, max_episodes=2))
    with tempfile.TemporaryDirectory() as folder:
        policy = AtlasPolicy(config.model, stats).save_pretrained(Path(folder) / "policy")
        eval_config = EvalConfig(suite="libero_spatial", tasks=[0], initial_states=list(range(30, 30 + episodes + 1)),
                                 camera_size=camera_size, replan_steps=config.eval.replan_steps, num_workers=1,
                                 videos=False)
        results = sim.evaluate(str(policy), sim.episode_specs(eval_config), num_workers=1)
    steady = results[1:]
    steps = sum(r.steps + sim.NUM_WAIT_STEPS for r in steady)
    instruction, bddl, init_states = sim.task_info("libero_spatial", 0)
    env = sim.make_env(bddl, camera_size)
    sim.start_episode(env, init_states[30])
    start = time.perf_counter()
    for _ in range(100):
        env.step(list(sim.WAIT_ACTION))
    bare = (time.perf_counter() - start) / 100
    env.close()
    per_step = sum(r.seconds for r in steady) / steps
    return {"episodes": len(steady), "steps": steps, "seconds_per_step": per_step, "bare_step_seconds": bare,
            "ratio": per_step / bare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="recorded episodes (the first task's first episode is used)")
    parser.add_argument("--tries", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy-config", default="configs/sim_demos.yaml")
    parser.add_argument("--episodes", type=int, default=2, help="eval-libero episodes timed (after a first one)")
    parser.add_argument("--output", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as in a worker
    figures = {"generation": generation(args.source, args.tries, args.seed),
               "eval_libero": evaluation(args.source, args.policy_config, args.episodes, 128)}
    g, e = figures["generation"], figures["eval_libero"]
    print(f"generation ({g['task']}): {len(g['kept'])} kept, {len(g['rejected'])} rejected of {args.tries} tries; "
          f"source recovery once: {g['recovery']['seconds']:.1f} s ({g['recovery']['steps']} steps)")
    if g["bare_step_seconds"]:
        print(f"  kept tries: {g['seconds_per_env_step'] * 1e3:.1f} ms per simulator step (settling included) = "
              f"{g['ratio_per_env_step']:.2f}x bare ({g['bare_step_seconds'] * 1e3:.1f} ms); per recorded episode "
              f"step {g['seconds_per_kept_episode_step'] * 1e3:.1f} ms = {g['ratio_per_kept_episode_step']:.2f}x")
    print(f"  demos per hour (one worker, rejected tries and recovery included): {g['demos_per_hour']:.1f}")
    print(f"eval-libero: {e['seconds_per_step'] * 1e3:.1f} ms per episode step (policy on its server, settling "
          f"included) = {e['ratio']:.2f}x bare ({e['bare_step_seconds'] * 1e3:.1f} ms), {e['episodes']} episodes")
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
