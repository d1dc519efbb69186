"""`atlas-vla generate-demos`: demonstrations in new layouts, generated from recorded ones and kept only when the
simulator says the task succeeded.

A run makes `num_demos` episodes per task. Each **try** of a task is numbered (0, 1, 2, ...) and fully decided by
the run's seed and that number: which source episode it re-targets (round robin over the task's episodes), its
layout (the first drawn from `scenes.layouts.layout_rng("generation", seed, suite, task, try)` that settles and in
which the goal's object can be named: `scenes.layouts.first_usable`) and, with `other_goals`, which object of the
goal's kind it moves. A try starts from the source's settled scene (`sources.recover`; `Generator.start_try`), lays
it out anew (`scenes.layouts`), names the goal's object where it now is (`scenes.instructions`), re-targets the
source's motion (`retarget`) and keeps the episode if the goal holds. The episodes kept are each task's first
`num_demos` kept tries in try order, so the result does not depend on how many workers ran or on interruptions.

Resumable: tries run in simulator worker processes and each finished one is appended (flushed, fsynced) to
`<output>.generation/tries.jsonl`, a kept episode's arrays written to `<output>.generation/episodes/` first; a rerun
with the same settings skips every try already there. The dataset is assembled at the end into `<output>` (a
LeRobot v2 folder in the source's layout, moved into place whole; each frame also says where the goal's object and
its target rest: `object_positions`) with `generation.json`, the report: per task the
tries, kept, why the others failed (the evaluation's failure phases, or no usable layout), the layouts rejected
(did not settle, or no phrase names the goal's object alone), steps executed and demos per hour of simulator time.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from atlas_vla.action_layout import GRIPPER, gripper_closed
from atlas_vla.constants import EEF_POSITION, EEF_ROTATION
from atlas_vla.files import staged_file, write_json_atomic, write_text_atomic
from atlas_vla.processes import die_with_parent
from atlas_vla.scenes.layouts import Layout
from atlas_vla.scenes.scene import Goal
from atlas_vla.generation.retarget import RETARGET_VERSION
from atlas_vla.generation.sources import Recovered, SourceEpisode, SourceRefused, read_episodes

logger = logging.getLogger(__name__)

MAX_TRIES_PER_DEMO = 8  # a task stops after num_demos * this many tries, short of demos if it must
NO_LAYOUT = "no usable layout"
ERROR = "error"  # the simulator failed during the try (the record's detail says how), or its worker died
SOURCE_REFUSED = "source refused"  # its source episode's replay differs from the recording (the detail says how)
REPORT_NAME = "generation.json"


@dataclass(frozen=True)
class Try:
    """One attempt at one generated episode (what a worker is given)."""

    task: str  # "<suite>/<task id>"
    number: int
    episode: SourceEpisode
    goal_object: str | None  # None: the task's own; else another object of its kind
    seed: int
    recovered: Recovered | None  # known from an earlier try of the same source episode
    work: str


def work_folder(output: Path) -> Path:
    return output.with_name(output.name + ".generation")


# ---- the worker side ----------------------------------------------------------------------------------------------

class Generator:
    """One task's live scene in this process (a LIBERO environment at the source's image size): recovers source
    episodes and runs tries in it."""

    def __init__(self, suite: str, task_id: int, image_size: int) -> None:
        from atlas_vla.eval.libero_sim import make_env, task_info
        from atlas_vla.scenes.scene import Scene

        self.key = (suite, task_id, image_size)
        self.suite = suite
        self.initial_states = task_info(suite, task_id)[2]
        self.env = make_env(task_info(suite, task_id)[1], image_size)
        self.scene = Scene(self.env)
        self.goal = self.scene.goal()
        self._settled: dict[int, np.ndarray] = {}  # official state -> its simulator state after the settling steps

    def settle(self) -> Any:
        """LIBERO's settling steps (`libero_sim.settle`); returns the last observation."""
        from atlas_vla.eval.libero_sim import settle

        return settle(self.env)

    def start(self, state: int | None, episode: SourceEpisode | None = None) -> Any:
        """The scene of official initial state `state`, settled, as LIBERO's protocol starts an episode
        (`libero_sim.start_episode`); `None`: the simulator state `episode` was recorded from, as its source recorded
        it (no settling: its first frame)."""
        from atlas_vla.eval.libero_sim import start_episode

        if state is None:
            self.env.seed(0)
            self.env.reset()
            return self.env.set_init_state(episode.initial_sim_state)
        return start_episode(self.env, self.initial_states[state])

    def start_try(self, state: int | None, episode: SourceEpisode) -> Any:
        """The scene a try lays out anew: `start`'s, come to rest (`libero_sim.settle_still`), its simulator state
        saved the first time and restored every time (the first included, so a try's result never depends on what
        its worker ran before), which saves a try the settling steps. A restored scene is identical on every
        restore, not to settling again: what the simulator state does not hold (the controllers', the solver's) makes
        the two drift apart by millimetres over a few steps of motion."""
        from atlas_vla.eval.libero_sim import settle_still

        if state is None:
            self.start(None, episode)
            return settle_still(self.env, self.scene)
        if state not in self._settled:
            self.start(state)
            settle_still(self.env, self.scene)
            self._settled[state] = self.env.get_sim_state().copy()
        self.env.seed(0)
        self.env.reset()
        return self.env.set_init_state(self._settled[state])

    def recover(self, episode: SourceEpisode) -> Recovered:
        """The initial state `episode` was recorded from, its replay checked (`sources.recover`)."""
        from atlas_vla.data.transforms import rotate_180
        from atlas_vla.generation.sources import recover

        return recover(episode, lambda state: self.start(state, episode), self._step,
                       lambda observation: rotate_180(observation["agentview_image"]),
                       lambda: self.goal.holds(self.scene),
                       self._poses_at_rest,
                       len(self.initial_states))

    def _step(self, action: np.ndarray, render: bool) -> Any:
        """One action; its observation, whose camera frames are black unless `render`."""
        from atlas_vla.eval.libero_sim import cameras_off

        with nullcontext() if render else cameras_off(self.env):
            return self.env.step(action.tolist())[0]

    def _poses_at_rest(self) -> dict[str, list[float]]:
        from atlas_vla.eval.libero_sim import settle_still

        settle_still(self.env, self.scene)
        return {name: pose.as_list() for name, pose in self.scene.poses().items()}

    def lay_out(self, episode: SourceEpisode, recovered: Recovered, layout: Layout) -> tuple[Any, Layout]:
        """The source's scene with the objects where `layout` places them, settled (`LayoutRejected` if it does not
        settle as placed)."""
        from atlas_vla.scenes.layouts import apply_layout

        self.start_try(recovered.initial_state, episode)
        return apply_layout(self.scene, layout, self.settle)

    def attempt(self, episode: SourceEpisode, recovered: Recovered, goal: Goal, observation: Any
                ) -> tuple[bool, str | None, dict[str, np.ndarray]]:
        """Re-target `episode` to the scene as it is now and run it: (kept, the failure phase when not, the episode's
        frames, wrist frames, states and actions as the source records them)."""
        from atlas_vla.data.transforms import libero_state, rotate_180
        from atlas_vla.eval.failures import FailureMonitor
        from atlas_vla.eval.suites import max_episode_steps
        from atlas_vla.generation.retarget import execute, hand_pose, plan, seen_pose
        from atlas_vla.scenes.scene import Pose
        from scipy.spatial.transform import Rotation

        states = episode.states.astype(float)
        # the source grasped the task's own object; the goal's may be its twin (`--other-goals`), of the same kind
        source_object = Pose.from_list(recovered.poses[self.goal.obj])
        source_target = Pose.from_list(recovered.poses[goal.target])
        new_object = seen_pose(self.scene.pose(goal.obj), source_object, self.scene.is_round(goal.obj))
        new_target = seen_pose(self.scene.pose(goal.target), source_target, self.scene.is_round(goal.target))
        waypoints = plan(states[:, EEF_POSITION], Rotation.from_rotvec(states[:, EEF_ROTATION]),
                         episode.actions[:, GRIPPER].astype(float), source_object, source_target, new_object,
                         new_target, hand_pose(observation))
        monitor = FailureMonitor(self.env, observation, goals=[(goal.predicate, goal.obj, goal.region)])
        frames: dict[str, list[np.ndarray]] = {"images": [], "wrist_images": [], "states": []}

        def step(action: np.ndarray) -> Any:
            nonlocal observation
            frames["images"].append(rotate_180(observation["agentview_image"]))
            frames["wrist_images"].append(rotate_180(observation["robot0_eye_in_hand_image"]))
            frames["states"].append(libero_state(observation["robot0_eef_pos"], observation["robot0_eef_quat"],
                                                 observation["robot0_gripper_qpos"]))
            observation, _, _, _ = self.env.step(action.tolist())
            monitor.observe(observation, action)
            return observation

        kept, actions = execute(step, observation, waypoints, lambda: goal.holds(self.scene),
                                max_episode_steps(self.suite))
        arrays = {"images": np.stack(frames["images"]), "wrist_images": np.stack(frames["wrist_images"]),
                  "states": np.stack(frames["states"]).astype(np.float32),
                  "actions": np.stack(actions).astype(np.float32)}
        return kept, None if kept else monitor.reason(), arrays

    def close(self) -> None:
        self.env.close()


_GENERATOR: list[Generator] = []  # this worker's live scene: tries come sorted by task, one scene at a time


def generator_for(suite: str, task_id: int, image_size: int) -> Generator:
    if _GENERATOR and _GENERATOR[0].key != (suite, task_id, image_size):
        _GENERATOR.pop().close()
    if not _GENERATOR:
        _GENERATOR.append(Generator(suite, task_id, image_size))
    return _GENERATOR[0]


def run_try(item: Try) -> dict[str, Any]:
    """Run one try in this process's simulator; returns its record (`kept`, and why not)."""
    from atlas_vla.scenes.instructions import instruction
    from atlas_vla.scenes.layouts import LayoutRejected, first_usable, layout_rng

    start_time = time.perf_counter()
    episode = item.episode
    generator = generator_for(episode.suite, episode.task_id, episode.image_size)
    task_goal = generator.goal
    record: dict[str, Any] = {"task": item.task, "try": item.number, "source": episode.source,
                              "source_episode": episode.episode, "goal_object": item.goal_object or task_goal.obj}
    recovered = item.recovered
    if recovered is None:
        recovered = generator.recover(episode)
        record["recovered"] = asdict(recovered)
    record["initial_state"] = recovered.initial_state
    goal = task_goal.retargeted(item.goal_object) if item.goal_object else task_goal
    seed, rng = layout_rng("generation", item.seed, episode.suite, episode.task_id, item.number)
    try:
        observation, layout, words, rejections = first_usable(
            generator.scene, rng, seed, lambda: generator.start_try(recovered.initial_state, episode), generator.settle,
            lambda: instruction(generator.scene, goal, episode.instruction))
    except LayoutRejected as error:
        return {**record, "kept": False, "reason": NO_LAYOUT, "detail": str(error), "steps": 0,
                "seconds": time.perf_counter() - start_time}
    record.update({"instruction": words, "layout": layout.record(), "layout_rejections": rejections})
    kept, reason, arrays = generator.attempt(episode, recovered, goal, observation)
    record.update({"kept": kept, "reason": reason, "steps": len(arrays["actions"])})
    if kept:
        name = f"episodes/{item.task.replace('/', '-')}/try-{item.number:06d}.npz"
        with staged_file(Path(item.work) / name) as staged:
            with open(staged, "wb") as file:
                np.savez(file, **arrays)
        record["file"] = name
    record["seconds"] = time.perf_counter() - start_time
    return record


def _worker_try(item: Try) -> dict[str, Any]:
    """`run_try` for the pool: an impossible layout request comes back as a record that stops the run; a refused
    source episode, or any other error (the simulator failed), as a failed try, so the others go on."""
    from atlas_vla.scenes.layouts import LayoutImpossible

    try:
        return run_try(item)
    except LayoutImpossible as error:
        return {"task": item.task, "try": item.number, "refused": str(error)}
    except SourceRefused as error:  # this source episode is not used again; the others go on
        return _failed_try(item, SOURCE_REFUSED, str(error))
    except Exception as error:  # MuJoCo, rendering: the try failed, the run goes on
        return _failed_try(item, ERROR, " ".join(f"{type(error).__name__}: {error}".split()))


def _failed_try(item: Try, reason: str, detail: str) -> dict[str, Any]:
    """The record of a try that ran no episode to its end: `reason` (`SOURCE_REFUSED`, `ERROR`) and how."""
    return {"task": item.task, "try": item.number, "source": item.episode.source,
            "source_episode": item.episode.episode, "kept": False, "reason": reason, "steps": 0, "seconds": 0.0,
            "detail": detail}


# ---- the main side ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What decides a run's tries: a rerun continues only with the same settings."""

    sources: list[str]
    seed: int
    other_goals: bool  # not num_demos: a later run may ask for more, and runs only the tries it adds
    controller: int = RETARGET_VERSION  # the re-targeting controller's version: its actions are the training targets

    def differences(self, recorded: dict[str, Any]) -> list[str]:
        """The names of the settings that differ from `recorded`; a source is the same when it names the same file
        or folder, however it was spelled (`../shared/x` from one folder, `/work/shared/x` from another)."""
        differ = [name for name, value in asdict(self).items() if name != "sources" and recorded.get(name) != value]
        theirs = recorded.get("sources")
        if not isinstance(theirs, list) or len(theirs) != len(self.sources) or not all(
                _same_source(a, b) for a, b in zip(self.sources, theirs)):
            differ.append("sources")
        return sorted(differ)


def _same_source(a: str, b: Any) -> bool:
    if a == b:
        return True
    try:
        return isinstance(b, str) and os.path.samefile(a, b)
    except OSError:  # a Hub id, or a folder that is gone
        return False


class TryLog:
    """`tries.jsonl` in the work folder: its first line the settings, then one finished try per line."""

    def __init__(self, work: Path, settings: Settings, fresh: bool) -> None:
        import fcntl

        work.mkdir(parents=True, exist_ok=True)
        self._lock = open(work / "lock", "w")  # held until `close` (or this process ends, however it ends)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ValueError(f"another generate-demos is writing {work}: wait for it, or give another --output")
        self.path = work / "tries.jsonl"
        identity = {"settings": asdict(settings)}
        self.records: list[dict[str, Any]] = []
        if self.path.is_file() and not fresh:
            lines = self.path.read_text().splitlines()
            header = json.loads(lines[0]) if lines else None
            differ = settings.differences((header or {}).get("settings", {}))
            if "controller" in differ:  # no flag chooses it: only a fresh start or another folder goes on
                self._lock.close()
                others = [name for name in differ if name != "controller"]
                raise ValueError(f"{work} holds the tries of another re-targeting controller (version "
                                 f"{header['settings'].get('controller', 1)}, this one is {settings.controller})"
                                 + (f" and other settings ({', '.join(others)})" if others else "")
                                 + ": their actions differ, so pass --fresh to start over, or give another --output")
            if differ:
                self._lock.close()
                raise ValueError(f"{work} holds the tries of a generation with other settings ({', '.join(differ)}): "
                                 f"run with the same settings to continue it, or pass --fresh to start over")
            spelled = dict(zip(header["settings"]["sources"], settings.sources))  # the log speaks this run's words
            for line in lines[1:]:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the last line, cut short by a kill: that try runs again
                    break
                if record.get("source") in spelled:
                    record["source"] = spelled[record["source"]]
                self.records.append(record)
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in [identity, *self.records]))
        else:
            write_text_atomic(self.path, json.dumps(identity) + "\n")
        self._file = open(self.path, "a")

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records.append(record)

    def close(self) -> None:
        self._file.close()
        self._lock.close()


@dataclass
class TaskPlan:
    """A task's source episodes and the objects its tries move, and what its tries have given so far."""

    name: str
    episodes: list[SourceEpisode]
    goal_objects: list[str | None]
    target: str  # where the task's goal puts its object (every goal object's target: re-targeting keeps it)
    finished: dict[int, dict[str, Any]] = field(default_factory=dict)
    submitted: set[int] = field(default_factory=set)

    def item(self, number: int, seed: int, recovered: dict[tuple[str, int], Recovered], work: Path) -> Try:
        goal = self.goal_objects[number % len(self.goal_objects)]
        episode = self.episodes[(number // len(self.goal_objects)) % len(self.episodes)]
        return Try(self.name, number, episode, goal, seed, recovered.get((episode.source, episode.episode)), str(work))

    def kept(self, num_demos: int) -> list[dict[str, Any]]:
        """The first `num_demos` kept tries among those finished without a gap before them."""
        found: list[dict[str, Any]] = []
        number = 0
        while number in self.finished and len(found) < num_demos:
            if self.finished[number].get("kept"):
                found.append(self.finished[number])
            number += 1
        return found

    def done(self, num_demos: int) -> bool:
        return len(self.kept(num_demos)) >= num_demos or len(self.finished) >= num_demos * MAX_TRIES_PER_DEMO


def goal_objects(episode: SourceEpisode, other_goals: bool) -> tuple[list[str | None], str]:
    """What a task's goal can move, read from its scene: its own goal's object (None), then, with `other_goals`, each
    other movable object of that kind; and the goal's target."""
    from atlas_vla.scenes.instructions import same_kind

    generator = Generator(episode.suite, episode.task_id, episode.image_size)
    try:
        goal = generator.goal
        others = same_kind(generator.scene, goal.obj) if other_goals else []
    finally:  # the main process keeps no simulator
        generator.close()
    return [None, *others], goal.target


def _plan(name: str, episodes: list[SourceEpisode], other_goals: bool) -> TaskPlan:
    """A task's plan: the objects its tries move and its goal's target (`goal_objects`)."""
    objects, target = goal_objects(episodes[0], other_goals)
    return TaskPlan(name, episodes, objects, target)


def episodes_by_task(sources: Sequence[str]) -> dict[tuple[str, int], list[SourceEpisode]]:
    """Every recorded episode of `sources` by task (suite, task id), tasks in the order they first appear; each task
    one pick-and-place (`check_goal`), and every source in the same image size, encoding and fps (`ValueError`
    naming them otherwise: generate-demos and render-scenes write one format)."""
    episodes = [episode for source in sources for episode in read_episodes(source)]
    formats = {(e.image_size, e.image_format, e.fps) for e in episodes}
    if len(formats) > 1:
        raise ValueError(f"the sources differ in image size, encoding or fps ({sorted(formats)}): use each "
                         f"separately")
    tasks: dict[tuple[str, int], list[SourceEpisode]] = {}
    for episode in episodes:
        tasks.setdefault((episode.suite, episode.task_id), []).append(episode)
    for found in tasks.values():
        check_goal(found[0])
    return tasks


def check_goal(episode: SourceEpisode) -> None:
    """A task whose goal is not one pick-and-place is refused before any try runs, naming the predicate."""
    from libero.libero.envs.bddl_utils import robosuite_parse_problem

    from atlas_vla.eval.libero_sim import task_info

    goals = robosuite_parse_problem(task_info(episode.suite, episode.task_id)[1])["goal_state"]
    if len(goals) != 1 or len(goals[0]) != 3 or goals[0][0].lower() not in ("on", "in"):
        shown = " and ".join("(" + " ".join(goal) + ")" for goal in goals)
        raise ValueError(f"{episode.suite} task {episode.task_id} ({episode.instruction!r}): its goal {shown} is not "
                         f"one pick-and-place (On or In); only those can be re-targeted")


def generate_demos(sources: Sequence[str], output: str | os.PathLike, *, num_demos: int, seed: int = 0,
                   num_workers: int = 1, other_goals: bool = False, fresh: bool = False) -> dict[str, Any]:
    """Generate `num_demos` episodes per task of `sources` into `output` (see the module's docstring); returns the
    report also written to `output/generation.json`."""
    from tqdm.auto import tqdm

    from atlas_vla.eval.libero_sim import require_simulator

    require_simulator()
    if num_demos < 1 or num_workers < 1:
        raise ValueError(f"--num-demos and --num-workers must be >= 1, got {num_demos} and {num_workers}")
    output = Path(output)
    tasks = {f"{suite}/{task_id}": found for (suite, task_id), found in episodes_by_task(sources).items()}
    work = work_folder(output)
    log = TryLog(work, Settings(list(sources), seed, other_goals), fresh)
    plans = {name: _plan(name, found, other_goals) for name, found in tasks.items()}
    known = Known({}, {})
    for record in log.records:
        plans[record["task"]].finished[record["try"]] = record
        known.learn(record)
    started = time.perf_counter()
    progress = tqdm(total=num_demos * len(plans), desc="generate-demos", unit="demo")
    try:
        _run(plans, log, known, num_demos, seed, num_workers, work, progress)
    finally:
        progress.close()
        log.close()
    report = _report(plans, num_demos, seed, time.perf_counter() - started)
    _assemble(plans, num_demos, next(iter(tasks.values()))[0], work, output, report, known)
    return report


@dataclass
class Known:
    """What finished tries established about source episodes (by source and episode index): the scene each was
    recovered in, or why it was refused."""

    recovered: dict[tuple[str, int], Recovered]
    refused: dict[tuple[str, int], str]

    def learn(self, record: dict[str, Any]) -> None:
        key = (record.get("source"), record.get("source_episode"))
        if "recovered" in record:
            self.recovered[key] = Recovered(**record["recovered"])
        if record.get("reason") == SOURCE_REFUSED:
            self.refused[key] = record["detail"]


def _finish(plan: TaskPlan, number: int, record: dict[str, Any], log: TryLog, known: Known) -> None:
    log.append(record)
    plan.finished[number] = record
    known.learn(record)


def _progress_text(plans: dict[str, TaskPlan], num_demos: int) -> str:
    kept = sum(len(plan.kept(num_demos)) for plan in plans.values())
    tried = sum(len(plan.finished) for plan in plans.values())
    return f"kept {kept} / tried {tried}"


def _run(plans: dict[str, TaskPlan], log: TryLog, known: Known, num_demos: int, seed: int, num_workers: int,
         work: Path, progress: Any) -> None:
    """Keep `num_workers` simulator processes busy with the next tries of the tasks still short of demos. A worker
    that dies (MuJoCo crashed) fails the tries in flight and the workers start again."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    context = mp.get_context("spawn")  # MuJoCo's rendering context does not survive a fork
    in_flight: dict[Any, tuple[str, int]] = {}
    progress.update(sum(len(plan.kept(num_demos)) for plan in plans.values()) - progress.n)
    pool = ProcessPoolExecutor(num_workers, mp_context=context, initializer=die_with_parent)
    try:
        while True:
            for plan in plans.values():  # tasks in order; each task's tries in order
                missing = num_demos - len(plan.kept(num_demos))
                while (len(in_flight) < 2 * num_workers and not plan.done(num_demos)
                       and len(plan.submitted) < max(2 * missing, 1)
                       and len(plan.finished) + len(plan.submitted) < num_demos * MAX_TRIES_PER_DEMO):
                    number = next(k for k in range(len(plan.finished) + len(plan.submitted) + 1)
                                  if k not in plan.finished and k not in plan.submitted)
                    item = plan.item(number, seed, known.recovered, work)
                    refusal = known.refused.get((item.episode.source, item.episode.episode))
                    if refusal is not None:  # its source episode was refused: recorded, not run
                        _finish(plan, number, _failed_try(item, SOURCE_REFUSED, refusal), log, known)
                        continue
                    plan.submitted.add(number)
                    in_flight[pool.submit(_worker_try, item)] = (plan.name, number)
            if not in_flight:
                return
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            broken = any(isinstance(future.exception(), BrokenProcessPool) for future in done)
            for future in list(in_flight) if broken else done:  # a dead worker takes every try in flight with it
                name, number = in_flight.pop(future)
                plan = plans[name]
                plan.submitted.discard(number)
                if broken:
                    record = _failed_try(plan.item(number, seed, known.recovered, work), ERROR,
                                        "a simulator worker died while it ran")
                else:
                    record = future.result()
                if "refused" in record:
                    raise ValueError(record["refused"])
                if record.get("reason") == SOURCE_REFUSED and (record["source"], record["source_episode"]) not in known.refused:
                    logger.warning("%s; it is not used", record["detail"])
                _finish(plan, number, record, log, known)
            if broken:
                logger.warning("a simulator worker died; the tries in flight are recorded as errors, workers restart")
                pool.shutdown(wait=False, cancel_futures=True)
                pool = ProcessPoolExecutor(num_workers, mp_context=context, initializer=die_with_parent)
            progress.update(sum(len(p.kept(num_demos)) for p in plans.values()) - progress.n)
            progress.set_postfix_str(_progress_text(plans, num_demos))
    finally:  # a refused source or an interrupt: the tries running finish (at most one each), the rest never start
        pool.shutdown(wait=True, cancel_futures=True)


def _report(plans: dict[str, TaskPlan], num_demos: int, seed: int, seconds: float) -> dict[str, Any]:
    """Per task: tries, kept, rejection reasons, simulator time and demos per hour of simulator time."""
    tasks = {}
    for name, plan in plans.items():
        records = list(plan.finished.values())
        worker_seconds = sum(r.get("seconds", 0.0) for r in records)
        kept = [r for r in records if r.get("kept")]
        tasks[name] = {
            "instruction": plan.episodes[0].instruction, "source_episodes": len(plan.episodes),
            "tries": len(records), "kept": len(kept), "used": len(plan.kept(num_demos)),
            "rejected": dict(Counter(r["reason"] for r in records if not r.get("kept"))),
            "refused_sources": {f"{r['source']} episode {r['source_episode']}": r["detail"]
                                for r in records if r.get("reason") == SOURCE_REFUSED},
            "layouts_rejected": dict(sum((Counter(r.get("layout_rejections", {})) for r in records), Counter())),
            "steps_executed": sum(r.get("steps", 0) for r in records),
            "steps_kept": sum(r.get("steps", 0) for r in kept),
            "worker_seconds": worker_seconds,
            "demos_per_hour": len(kept) / worker_seconds * 3600 if worker_seconds else None,
        }
    return {"num_demos": num_demos, "seed": seed, "controller": RETARGET_VERSION, "seconds": seconds, "tasks": tasks}


def object_positions(record: dict[str, Any], target: str, recovered: Recovered, actions: np.ndarray) -> np.ndarray:
    """A kept try's `OBJECT_POSITIONS` per frame (T, 6): where its goal object rests (the source's scene with the
    try's layout applied) until the gripper first closes, NaN from then on (the object moves with the hand), and
    where the target rests, every frame; NaN for an object the scene does not hold (a fixture)."""
    rest = {**recovered.poses, **record["layout"]["settled"]}
    nan = np.full(3, np.nan)
    goal, target_xyz = (np.asarray(rest[name][:3]) if name in rest else nan for name in (record["goal_object"], target))
    closes = np.flatnonzero(gripper_closed(actions[:, GRIPPER]))
    grasp = int(closes[0]) if closes.size else len(actions)
    positions = np.tile(np.concatenate((goal, target_xyz)), (len(actions), 1)).astype(np.float32)
    positions[grasp:, :3] = np.nan
    return positions


def _assemble(plans: dict[str, TaskPlan], num_demos: int, like: SourceEpisode, work: Path, output: Path,
              report: dict[str, Any], known: Known) -> None:
    """Write the kept episodes, with their `object_positions`, into the LeRobot folder `output` (replaced whole)
    with the report."""
    from atlas_vla.data.lerobot_writer import LeRobotV2Writer

    kept = [(plan, record) for plan in plans.values() for record in plan.kept(num_demos)]
    write_json_atomic(work / REPORT_NAME, report)
    if not kept:
        raise ValueError(f"no try succeeded ({_progress_text(plans, num_demos)}); nothing written to {output}; "
                         f"the report is {work / REPORT_NAME}")
    writer = LeRobotV2Writer(output, fps=like.fps, overwrite=True, image_format=like.image_format)
    try:
        for plan, record in kept:
            recovered = known.recovered[(record["source"], record["source_episode"])]
            with np.load(work / record["file"]) as arrays:
                writer.add_episode(arrays["images"], arrays["wrist_images"], arrays["states"], arrays["actions"],
                                   record["instruction"],
                                   metadata={"generation": {**{key: record[key] for key in (
                                       "task", "try", "source_episode", "initial_state", "goal_object", "layout")},
                                       "target": plan.target}},
                                   object_positions=object_positions(record, plan.target, recovered, arrays["actions"]))
        write_json_atomic(writer.tmp / REPORT_NAME, report)
        writer.close()
    except BaseException:
        writer.abort()
        raise
