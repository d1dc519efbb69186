"""The policy server on this machine: latency and throughput with concurrent clients, batching on and
off; and simulator evaluation with one shared server vs. a model loaded in every worker.

    python benchmarks/serve.py --policy outputs/demo/final --policy outputs/sim_demos/final
    MUJOCO_GL=egl python benchmarks/serve.py --policy outputs/sim_demos/final --eval --workers 1 2 4

Server part: `atlas-vla serve`'s `PolicyServer` runs in this process; each client is its own process
(openpi's request layout, Atlas's client) sending `--requests` observations back to back after a
warm-up; latency is per request as the client sees it, throughput is all requests over the wall time.
Eval part: the same episodes (libero_spatial task 0, initial states 0..episodes-1, `--max-steps`
steps each) with N simulator workers, through one server started by `evaluate` (today's path) and
with a model loaded in every worker (the path before the server); episodes per minute include
loading the model(s) and building the environments; peak memory is the resident set of this process
and all its children together, sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import threading
import time
from typing import Any

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")


def observation(size: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"agentview_image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "wrist_image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "state": rng.normal(0, 0.1, 8), "task_description": "put the black bowl on the plate"}


def _client(uri: str, size: int, requests: int, seed: int, barrier: Any, out: Any) -> None:
    from atlas_vla.serving.client import RemotePolicy

    policy = RemotePolicy(uri)
    obs = observation(size, seed)
    for _ in range(3):  # warm-up
        policy.predict_chunk(obs)
    barrier.wait()
    latencies = []
    for _ in range(requests):
        start = time.perf_counter()
        policy.predict_chunk(obs)
        latencies.append(time.perf_counter() - start)
    policy.close()
    out.put((time.perf_counter(), latencies))


def bench_server(policy_path: str, clients: list[int], requests: int, size: int) -> None:
    import torch

    from atlas_vla.models.policy import AtlasPolicy
    from atlas_vla.serving.server import serve_in_background

    policy = AtlasPolicy.from_pretrained(policy_path)
    print(f"\n{policy_path}: image {policy.config.image_size} px, wrist camera {policy.config.use_wrist_camera}, "
          f"{torch.get_num_threads()} torch threads in the server")
    print(f"{'batching':<24} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'obs/s':>8}")
    context = mp.get_context("spawn")
    for label, batch, wait in (("off (max batch 1)", 1, 0.0), ("on (max 8, wait 5 ms)", 8, 5.0)):
        with serve_in_background(policy, port=0, max_batch_size=batch, max_wait_ms=wait) as server:
            for n in clients:
                barrier, out = context.Barrier(n + 1), context.Queue()
                processes = [context.Process(target=_client, args=(f"ws://127.0.0.1:{server.port}", size, requests, i,
                                                                   barrier, out)) for i in range(n)]
                for process in processes:
                    process.start()
                barrier.wait()
                start = time.perf_counter()
                results = [out.get(timeout=1800) for _ in processes]
                for process in processes:
                    process.join()
                wall = max(end for end, _ in results) - start
                latencies = np.concatenate([lat for _, lat in results]) * 1e3
                print(f"{label:<24} {n:>7} {np.percentile(latencies, 50):8.1f} {np.percentile(latencies, 99):8.1f} "
                      f"{len(latencies) / wall:8.1f}", flush=True)


class PeakMemory:
    """Peak resident memory of this process and all its descendants, sampled in a thread."""

    def __enter__(self) -> "PeakMemory":
        import psutil

        self.peak, self._stop = 0, threading.Event()
        me = psutil.Process()

        def sample() -> None:
            while not self._stop.is_set():
                total = 0
                for process in [me, *me.children(recursive=True)]:
                    try:
                        total += process.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
                self._stop.wait(0.2)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


_worker_policy: Any = None


def _load_in_worker(policy_path: str) -> None:
    global _worker_policy
    import torch

    torch.set_num_threads(1)  # as the in-worker evaluation did
    from atlas_vla.models.policy import AtlasPolicy
    from atlas_vla.runtime import LocalPolicy

    _worker_policy = LocalPolicy(AtlasPolicy.from_pretrained(policy_path))


def _episode_in_worker(spec: Any) -> bool:
    from atlas_vla.eval import libero_sim as sim

    envs = getattr(_episode_in_worker, "envs", {})
    _episode_in_worker.envs = envs  # type: ignore[attr-defined]
    return sim.evaluate_episode(spec, _worker_policy, envs).error is None


def bench_eval(policy_path: str, workers: list[int], episodes: int, max_steps: int, camera_size: int) -> None:
    from atlas_vla.eval import libero_sim as sim

    specs = [sim.EpisodeSpec("libero_spatial", 0, state, max_steps, None, camera_size) for state in range(episodes)]
    print(f"\nevaluation of {policy_path}: {episodes} episodes x {max_steps} steps, camera {camera_size} px")
    print(f"{'path':<22} {'workers':>7} {'episodes/min':>12} {'peak RSS GB':>12}")
    context = mp.get_context("spawn")
    for n in workers:
        with PeakMemory() as memory:
            start = time.perf_counter()
            results = sim.evaluate(policy_path, specs, num_workers=n)
            wall = time.perf_counter() - start
        assert all(r.error is None for r in results), [r.error for r in results if r.error]
        print(f"{'one shared server':<22} {n:>7} {episodes / wall * 60:12.2f} {memory.peak / 2**30:12.2f}", flush=True)
        with PeakMemory() as memory:
            start = time.perf_counter()
            with context.Pool(n, initializer=_load_in_worker, initargs=(policy_path,)) as pool:
                ok = pool.map(_episode_in_worker, specs, chunksize=1)
            wall = time.perf_counter() - start
        assert all(ok)
        print(f"{'a model per worker':<22} {n:>7} {episodes / wall * 60:12.2f} {memory.peak / 2**30:12.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", action="append", required=True, help="a saved policy (repeat for several)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=100, help="timed requests per client")
    parser.add_argument("--image-size", type=int, default=128, help="camera images sent by the clients")
    parser.add_argument("--eval", action="store_true", help="also time simulator evaluation (needs the [sim] extra)")
    parser.add_argument("--eval-only", action="store_true", help="time simulator evaluation only")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--camera-size", type=int, default=128)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPU cores")
    for policy in args.policy:
        if not args.eval_only:
            bench_server(policy, args.clients, args.requests, args.image_size)
        if args.eval or args.eval_only:
            bench_eval(policy, args.workers, args.episodes, args.max_steps, args.camera_size)


if __name__ == "__main__":
    main()
