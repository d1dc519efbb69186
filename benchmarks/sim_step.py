"""LIBERO simulator costs on this machine: env build + reset, seconds per step (two cameras) and per
policy query, one full episode, and what a 500-episode suite costs with N parallel workers.

    MUJOCO_GL=egl python benchmarks/sim_step.py [--policy outputs/demo/final] [--camera-size 128 256]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=None, help="a saved policy to time per query (default: none)")
    parser.add_argument("--camera-size", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--steps", type=int, default=50, help="steps timed per camera size")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as in an evaluation worker
    from atlas_vla.eval import libero_sim as sim

    instruction, bddl, init_states = sim.task_info("libero_spatial", 0)
    step_seconds = {}
    for size in args.camera_size:
        start = time.perf_counter()
        env = sim.make_env(bddl, size)
        env.seed(0)
        env.reset()
        obs = env.set_init_state(init_states[0])
        build = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.steps):
            obs, _, _, _ = env.step(list(sim.WAIT_ACTION))
        step_seconds[size] = (time.perf_counter() - start) / args.steps
        print(f"camera {size:>3}: env build + reset {build:5.2f} s, step {step_seconds[size] * 1e3:6.1f} ms")
        env.close()
    query, horizon = 0.0, 1
    if args.policy:
        from atlas_vla.models.policy import AtlasPolicy

        policy = AtlasPolicy.from_pretrained(args.policy)
        observation = sim.sim_observation(obs, instruction)
        policy.predict_action(observation)
        start = time.perf_counter()
        for _ in range(10):
            policy.predict_action(observation)
        query = (time.perf_counter() - start) / 10
        horizon = policy.config.action_horizon
        print(f"policy query (1 thread): {query * 1e3:.1f} ms, chunk of {horizon} (one query per chunk)")
    size = args.camera_size[-1]
    episode = (220 + sim.NUM_WAIT_STEPS) * step_seconds[size] + -(-220 // horizon) * query
    print(f"one 220-step episode at {size}px, estimated from the step and query times: {episode:.1f} s")
    if args.policy:  # measure one real episode end to end (the untrained demo policy never succeeds early)
        from atlas_vla.runtime import PolicyRuntime

        env = sim.make_env(bddl, size)
        start = time.perf_counter()
        success, steps, _ = sim.run_episode(env, PolicyRuntime(policy), init_states[0], instruction, max_steps=220)
        episode = time.perf_counter() - start
        env.close()
        print(f"one {steps}-step episode at {size}px, measured: {episode:.1f} s (success {success})")
    cores = os.cpu_count() or 1
    for workers in args.workers:
        # extrapolated: workers beyond the core count share cores, so the wall time stops improving there
        effective = min(workers, cores)
        print(f"500 episodes with {workers} workers (extrapolated): ~{500 * episode / effective / 60:.0f} min "
              f"on {cores} cores")


if __name__ == "__main__":
    main()
