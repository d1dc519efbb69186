"""`atlas-vla render-scenes`: single frames of the recorded tasks' scenes laid out anew, each with the instruction
that names its goal's object where it now is and where that object and its target rest. They carry no actions: they
teach the policy's locate query (`model.locate_weight`) where things are, in thousands of layouts, at a small share
of a generated episode's simulator time (a generated episode runs a whole motion; a scene renders one frame).

Scene `n` of a task is decided by the run's seed and `n` alone: its initial state is `initial_states[n % k]` (k
states), its goal's object the `n // k`-th, cyclically, of the task's own and (with `other_goals`) the other
movable objects of that kind, and its layout the first drawn from `layouts.layout_rng("scenes", seed, suite, task,
n)` that settles and in which that object can be named (`layouts.first_usable`); the "scenes" stream is neither
generation's nor evaluation's. Only official initial states are used (by default 0-19, those the shared recordings
start from), never the recorded episodes' motions.

Resumable: each finished scene is written as one file, `<output>.scenes/<suite>-<task>/scene-<n>.npz` (staged, then
renamed), and a rerun with the same settings renders only the scenes missing. The dataset is assembled at the end
into `<output>`, a LeRobot v2 folder of one-frame episodes in the recordings' image size and encoding: the frame's
two camera images and state, its instruction, `object_positions` (the goal object's then the target's xyz; NaN for
a fixture) and an action of NaN, which says "no action known" (`data.samples` masks it out of the action loss and
`data.normalization` out of the statistics), with `scenes.json`, the report.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from atlas_vla.action_layout import ACTION_DIM
from atlas_vla.files import read_json, staged_file, write_json_atomic
from atlas_vla.generation.generate import episodes_by_task, generator_for, goal_objects
from atlas_vla.generation.sources import SourceEpisode
from atlas_vla.processes import die_with_parent

logger = logging.getLogger(__name__)

REPORT_NAME = "scenes.json"
SETTINGS_NAME = "settings.json"
DEFAULT_INITIAL_STATES = tuple(range(20))


@dataclass(frozen=True)
class SceneSettings:
    """What decides a run's scenes: a rerun continues only with the same settings."""

    seed: int
    other_goals: bool
    initial_states: list[int]
    image_size: int  # the sources' (a scene file holds its frames at this size)
    image_format: str


@dataclass(frozen=True)
class SceneJob:
    """One scene to render (what a worker is given)."""

    suite: str
    task_id: int
    number: int
    initial_state: int
    goal_object: str | None  # None: the task's own; else another object of its kind
    instruction: str  # the recorded episodes' instruction for the task
    image_size: int
    seed: int
    path: str


def work_folder(output: Path) -> Path:
    return output.with_name(output.name + ".scenes")


def render_scene(job: SceneJob) -> dict[str, Any]:
    """Render one scene in this process's simulator into `job.path`; returns its record."""
    from atlas_vla.data.transforms import libero_state, rotate_180
    from atlas_vla.scenes.instructions import instruction
    from atlas_vla.scenes.layouts import LayoutRejected, first_usable, layout_rng

    started = time.perf_counter()
    generator = generator_for(job.suite, job.task_id, job.image_size)
    goal = generator.goal.retargeted(job.goal_object) if job.goal_object else generator.goal
    record: dict[str, Any] = {"number": job.number, "initial_state": job.initial_state, "goal_object": goal.obj,
                              "target": goal.target}
    seed, rng = layout_rng("scenes", job.seed, job.suite, job.task_id, job.number)
    try:
        with _soft_resets(generator.env):
            observation, layout, words, rejections = first_usable(
                generator.scene, rng, seed, lambda: generator.start_try(job.initial_state, None), generator.settle,
                lambda: instruction(generator.scene, goal, job.instruction))
    except LayoutRejected as error:
        record.update({"kept": False, "detail": str(error)})
        arrays: dict[str, Any] = {}
    else:
        held = generator.scene.poses()
        positions = [held[name].position if name in held else (np.nan,) * 3 for name in (goal.obj, goal.target)]
        record.update({"kept": True, "instruction": words, "layout": layout.record(), "layout_rejections": rejections})
        arrays = {"image": rotate_180(observation["agentview_image"]),
                  "wrist_image": rotate_180(observation["robot0_eye_in_hand_image"]),
                  "state": libero_state(observation["robot0_eef_pos"], observation["robot0_eef_quat"],
                                        observation["robot0_gripper_qpos"]).astype(np.float32),
                  "object_positions": np.asarray(positions, np.float32).reshape(6)}
    record["seconds"] = time.perf_counter() - started
    with staged_file(job.path) as staged:
        with open(staged, "wb") as file:
            np.savez(file, record=np.array(json.dumps(record)), **arrays)
    return record


@contextmanager
def _soft_resets(env: Any) -> Iterator[None]:
    """Inside the block robosuite's resets keep the model they loaded. By default (`hard_reset`) each reset loads the
    whole model again, about 4 s of the 5 a scene took; a scene's reset is followed by a saved simulator state
    restored whole, so the loaded model serves (measured: frames within 0.2/255 on average of a hard reset's)."""
    robosuite_env = env.env
    hard = robosuite_env.hard_reset
    robosuite_env.hard_reset = False
    try:
        yield
    finally:
        robosuite_env.hard_reset = hard


def _read_scene(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with np.load(path) as arrays:
        return json.loads(str(arrays["record"])), {key: arrays[key] for key in arrays.files if key != "record"}


def _check_settings(work: Path, settings: SceneSettings, fresh: bool) -> None:
    """Refuse to continue scenes rendered with other settings (`fresh` discards them instead), and to touch a folder
    render-scenes did not write."""
    import shutil

    path = work / SETTINGS_NAME
    if work.exists() and not path.is_file():
        raise ValueError(f"{work} exists and holds no {SETTINGS_NAME}: render-scenes did not write it; move it away "
                         f"or write to another --output")
    if path.is_file() and not fresh:
        recorded = read_json(path)
        differ = sorted(name for name, value in asdict(settings).items() if recorded.get(name) != value)
        if differ:
            raise ValueError(f"{work} holds scenes rendered with other settings ({', '.join(differ)}: "
                             f"{[recorded.get(name) for name in differ]} there, "
                             f"{[asdict(settings)[name] for name in differ]} now); pass --fresh to discard them, or "
                             f"write to another --output")
    elif path.is_file():
        shutil.rmtree(work)
    write_json_atomic(path, asdict(settings))


def render_scenes(sources: Sequence[str], output: str | os.PathLike, *, num_scenes: int, seed: int = 0,
                  num_workers: int = 1, other_goals: bool = True,
                  initial_states: Sequence[int] = DEFAULT_INITIAL_STATES, fresh: bool = False) -> dict[str, Any]:
    """Render `num_scenes` scenes per task of `sources` into `output` (see the module's docstring); returns the
    report also written to `output/scenes.json`."""
    from tqdm.auto import tqdm

    from atlas_vla.eval.libero_sim import require_simulator

    require_simulator()
    if num_scenes < 1 or num_workers < 1 or not initial_states:
        raise ValueError(f"--num-scenes and --num-workers must be >= 1 and --initial-states not empty, got "
                         f"{num_scenes}, {num_workers} and {list(initial_states)}")
    output = Path(output)
    tasks = {task: found[0] for task, found in episodes_by_task(sources).items()}
    _check_states(tasks, initial_states)
    like = next(iter(tasks.values()))
    work = work_folder(output)
    _check_settings(work, SceneSettings(seed, other_goals, [int(s) for s in initial_states], like.image_size,
                                        like.image_format), fresh)
    jobs = []
    for (suite, task_id), episode in tasks.items():
        objects, _ = goal_objects(episode, other_goals)
        for number in range(num_scenes):
            jobs.append(SceneJob(suite, task_id, number, int(initial_states[number % len(initial_states)]),
                                 objects[(number // len(initial_states)) % len(objects)], episode.instruction,
                                 episode.image_size, seed,
                                 str(work / f"{suite}-{task_id}" / f"scene-{number:06d}.npz")))
    missing = [job for job in jobs if not Path(job.path).is_file()]
    started = time.perf_counter()
    with tqdm(total=len(jobs), initial=len(jobs) - len(missing), desc="render-scenes", unit="scene") as progress:
        _run(missing, num_workers, progress)
    report = _report(jobs, seed, time.perf_counter() - started)
    _assemble(jobs, like, work, output, report)
    return report


def _check_states(tasks: dict[tuple[str, int], SourceEpisode], initial_states: Sequence[int]) -> None:
    """Before anything is rendered: every task has each of `initial_states` among its official ones."""
    from atlas_vla.eval.libero_sim import task_info

    for suite, task_id in tasks:
        count = len(task_info(suite, task_id)[2])
        beyond = [state for state in initial_states if not 0 <= state < count]
        if beyond:
            raise ValueError(f"--initial-states {beyond}: {suite} task {task_id} has official initial states 0-"
                             f"{count - 1}")


def _run(jobs: list[SceneJob], num_workers: int, progress: Any) -> None:
    """Render `jobs` in `num_workers` simulator processes (each keeps one task's scene at a time: jobs come sorted
    by task); a scene that fails in the simulator stops the run, and the scenes already written stay."""
    if not jobs:
        return
    from concurrent.futures import ProcessPoolExecutor

    context = mp.get_context("spawn")  # MuJoCo's rendering context does not survive a fork
    with ProcessPoolExecutor(num_workers, mp_context=context, initializer=die_with_parent) as pool:
        for _ in pool.map(render_scene, jobs, chunksize=4):
            progress.update(1)


def _report(jobs: list[SceneJob], seed: int, seconds: float) -> dict[str, Any]:
    """Per task: scenes asked for, kept, why the others have none, the layouts rejected on the way, and the
    simulator seconds per kept scene."""
    tasks: dict[str, Any] = {}
    for job in jobs:
        record, _ = _read_scene(Path(job.path))
        row = tasks.setdefault(f"{job.suite}/{job.task_id}", {"scenes": 0, "kept": 0, "no_layout": 0,
                                                              "layout_rejections": Counter(), "seconds": 0.0})
        row["scenes"] += 1
        row["kept" if record["kept"] else "no_layout"] += 1
        row["layout_rejections"].update(record.get("layout_rejections", {}))
        row["seconds"] += record["seconds"]
    for row in tasks.values():
        row["layout_rejections"] = dict(row["layout_rejections"])
        row["seconds_per_scene"] = row["seconds"] / row["kept"] if row["kept"] else None
    return {"seed": seed, "seconds": seconds, "tasks": tasks}


def _assemble(jobs: list[SceneJob], like: SourceEpisode, work: Path, output: Path, report: dict[str, Any]) -> None:
    """Write the kept scenes as one-frame episodes into the LeRobot folder `output` (replaced whole) with the
    report."""
    from atlas_vla.data.lerobot_writer import LeRobotV2Writer

    write_json_atomic(work / REPORT_NAME, report)
    writer = LeRobotV2Writer(output, fps=like.fps, overwrite=True, image_format=like.image_format)
    try:
        for job in jobs:
            record, arrays = _read_scene(Path(job.path))
            if not record["kept"]:
                continue
            writer.add_episode(arrays["image"][None], arrays["wrist_image"][None], arrays["state"][None],
                               np.full((1, ACTION_DIM), np.nan, np.float32), record["instruction"],
                               metadata={"scene": {"task": f"{job.suite}/{job.task_id}", **{key: record[key] for key in (
                                   "number", "initial_state", "goal_object", "target", "layout")}}},
                               object_positions=arrays["object_positions"][None])
        if not writer.episodes:
            raise ValueError(f"no scene had a usable layout; nothing written to {output}; the report is "
                             f"{work / REPORT_NAME}")
        write_json_atomic(writer.tmp / REPORT_NAME, report)
        writer.close()
    except BaseException:
        writer.abort()
        raise
