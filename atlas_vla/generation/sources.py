"""The recorded episodes generation starts from, and the simulator states they were recorded in.

A source is anything `data.source` reads whose episodes were recorded in the LIBERO simulator: raw LIBERO HDF5
files, whose demos carry the simulator `states` they were recorded in (an episode starts from its first), and LeRobot
folders or Hub datasets (e.g. `physical-intelligence/libero`'s layout), which hold images, states and actions but no
simulator state, so the scene an episode started in is recovered: each task's official initial states (those
below `SOURCE_STATES`: states from 20 on are kept for evaluation) are set, settled as LIBERO's protocol settles
them, and rendered, and the first whose frame matches the episode's first (`FRAME_TOLERANCE`) with the arm where the
episode's first state has it (`STATE_TOLERANCE_M`) is taken, trying first the state the episode's position among its
task's episodes suggests (the scenes of one task differ little in pixels: the arm's start tells them apart). The episode is then replayed from it:
every step's end-effector position must stay within `STATE_TOLERANCE_M` of the recorded state, the frames at four
points within `FRAME_TOLERANCE`, and the goal must hold at the end (or within `GRACE_STEPS` of holding still). An
episode that fails is refused, naming it; generation then goes on without it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
from PIL import Image

from atlas_vla.action_layout import without_action
from atlas_vla.constants import ACTION, AGENT_IMAGE, EEF_POSITION, EPISODE_INDEX, INSTRUCTION, STATE, WRIST_IMAGE

SOURCE_STATES = 20  # official initial states 0..19 may be a source's; 20 and above are evaluation's alone
FRAME_TOLERANCE = 6.0  # mean absolute difference of a frame, of 255 (JPEG noise is at most 2.9 on the fixtures)
STATE_TOLERANCE_M = 0.005
GRACE_STEPS = 10  # after the last recorded action, steps held still in which the goal may still come to hold
BASE_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")


class SourceRefused(ValueError):
    """A source episode that cannot be generated from (not a LIBERO task, or its replay differs)."""


@dataclass
class SourceEpisode:
    """One recorded episode: its actions and states, the frames its replay is checked against, and its task."""

    source: str
    episode: int  # its episode index in the source
    ordinal: int  # its position among the source's episodes of the same instruction
    instruction: str
    states: np.ndarray  # (T, 8) float32
    actions: np.ndarray  # (T, 7) float32
    checked_frames: dict[int, np.ndarray]  # frame index -> upright agent-view image (H, W, 3) uint8
    image_format: str  # "jpeg" or "png": how the source stores its frames
    suite: str = ""
    task_id: int = -1
    fps: int = 20
    initial_sim_state: np.ndarray | None = None  # raw HDF5: the simulator state it was recorded from

    @property
    def name(self) -> str:
        return f"{self.source} episode {self.episode}"

    @property
    def image_size(self) -> int:
        return int(self.checked_frames[0].shape[0])


@dataclass
class Recovered:
    """What the replay of a source episode established: the scene it starts from (an official initial state, or
    None: the simulator state its source recorded) and where every object was at its first frame."""

    initial_state: int | None
    poses: dict[str, list[float]] = field(default_factory=dict)  # object -> Pose.as_list() at the first frame


def _decode(image: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image["bytes"])).convert("RGB"))


def _format(image: dict[str, Any]) -> str:
    return "jpeg" if image["bytes"][:2] == b"\xff\xd8" else "png"


def checked_indices(length: int) -> list[int]:
    """The frames a replay is compared at: the first, two in between and the last."""
    return sorted({0, length // 3, 2 * length // 3, length - 1})


def read_episodes(source: str) -> list[SourceEpisode]:
    """Every episode of `source` (raw LIBERO HDF5, or a LeRobot folder or Hub id `data.source` reads), with its task
    found (`find_task`); `SourceRefused` naming the episode whose instruction is no LIBERO task."""
    from atlas_vla.data.sources import is_raw_hdf5, load_libero

    episodes = _hdf5_episodes(source) if is_raw_hdf5(Path(source)) else _lerobot_episodes(source, load_libero(source))
    for found in episodes:
        found.suite, found.task_id = find_task(found.instruction, found.name)
    return episodes


def _hdf5_episodes(source: str) -> list[SourceEpisode]:
    from atlas_vla.data.hdf5 import find_hdf5_files, iter_demos
    from atlas_vla.data.transforms import rotate_180

    episodes = []
    for path in find_hdf5_files([source]):
        for ordinal, (demo, instruction, arrays) in enumerate(iter_demos(path)):
            if "states" not in arrays:
                raise SourceRefused(f"{path} demo_{demo}: no simulator 'states' recorded: not generated from")
            length = len(arrays["actions"])
            states = np.concatenate([arrays["obs/ee_pos"], arrays["obs/ee_ori"], arrays["obs/gripper_states"]], 1)
            frames = {i: rotate_180(arrays["obs/agentview_rgb"][i]) for i in checked_indices(length)}
            episodes.append(SourceEpisode(str(path), demo, ordinal, instruction, states.astype(np.float32),
                                          arrays["actions"].astype(np.float32), frames, "png",
                                          initial_sim_state=np.asarray(arrays["states"][0], np.float64)))
    return episodes


def _lerobot_episodes(source: str, dataset: datasets.Dataset) -> list[SourceEpisode]:
    raw = dataset.cast_column(AGENT_IMAGE, datasets.Image(decode=False)).remove_columns([WRIST_IMAGE])
    numbers = raw.select_columns([STATE, ACTION, EPISODE_INDEX, INSTRUCTION]).with_format("numpy")[:]
    episodes_index = numbers[EPISODE_INDEX]
    episodes: list[SourceEpisode] = []
    seen: dict[str, int] = {}
    for episode in dict.fromkeys(episodes_index.tolist()):
        rows = np.flatnonzero(episodes_index == episode)
        instruction = str(numbers[INSTRUCTION][rows[0]])
        if without_action(np.asarray(numbers[ACTION][rows], np.float32)).any():
            raise ValueError(f"{source} episode {episode}: frames without an action (rendered scenes?); only recorded "
                             f"demonstrations are generated or rendered from")
        frames = {i: raw[int(rows[i])][AGENT_IMAGE] for i in checked_indices(len(rows))}
        episodes.append(SourceEpisode(
            source, int(episode), seen.get(instruction, 0), instruction,
            np.asarray(numbers[STATE][rows], np.float32), np.asarray(numbers[ACTION][rows], np.float32),
            {i: _decode(image) for i, image in frames.items()}, _format(frames[0])))
        seen[instruction] = seen.get(instruction, 0) + 1
    return episodes


def find_task(instruction: str, where: str) -> tuple[str, int]:
    """The LIBERO suite and task whose instruction is `instruction` (the first of `BASE_SUITES` that has it)."""
    for suite, task_id in _tasks_by_instruction().get(instruction, []):
        return suite, task_id
    raise SourceRefused(f"{where}: {instruction!r} is the instruction of no task of {', '.join(BASE_SUITES)}: "
                        f"only episodes recorded in the LIBERO simulator can be generated from")


def _tasks_by_instruction() -> dict[str, list[tuple[str, int]]]:
    from libero.libero import benchmark

    found: dict[str, list[tuple[str, int]]] = {}
    suites = benchmark.get_benchmark_dict()
    for suite in BASE_SUITES:
        tasks = suites[suite]()
        for task_id in range(tasks.n_tasks):
            found.setdefault(tasks.get_task(task_id).language, []).append((suite, task_id))
    return found


def frame_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def recover(episode: SourceEpisode, start: Callable[[int | None], Any], step: Callable[[np.ndarray, bool], Any],
            frame: Callable[[Any], np.ndarray], succeeded: Callable[[], bool], poses: Callable[[], dict[str, list]],
            num_states: int) -> Recovered:
    """Find the scene `episode` was recorded from and check its replay (see the module's docstring). `start(i)`
    resets the scene to official initial state i, settled (`start(None)`: to the episode's own recorded simulator
    state) and returns the observation; `step(action, render)` runs one action (its frames rendered only when `render`:
    the replay looks at a few); `frame(observation)` is its upright
    agent-view image; `poses()` the objects' poses once the scene has come to rest (it may step the simulator: a
    bowl dropped onto a ramekin by the initial state is grasped where it came to lean, not where it was at the
    first frame)."""
    if episode.initial_sim_state is not None:
        candidates: list[int | None] = [None]
    else:
        candidates = list(range(min(num_states, SOURCE_STATES)))
        if episode.ordinal in candidates:  # recorded in order (as LIBERO's own protocol does): try that one first
            candidates.remove(episode.ordinal)
            candidates.insert(0, episode.ordinal)
    first = episode.checked_frames[0]
    closest: tuple[float, int | None] = (np.inf, None)
    for state in candidates:
        observation = start(state)
        difference = frame_difference(frame(observation), first)
        arm = float(np.linalg.norm(np.asarray(observation["robot0_eef_pos"]) - episode.states[0, EEF_POSITION]))
        if difference < closest[0]:
            closest = (difference, state)
        if difference <= FRAME_TOLERANCE and arm <= STATE_TOLERANCE_M:  # similar scenes differ little in pixels
            break
    else:
        if episode.initial_sim_state is not None:
            raise SourceRefused(f"{episode.name}: its recorded simulator state renders a first frame {closest[0]:.1f} "
                                f"of 255 from its recorded one, or puts the arm elsewhere (tolerances "
                                f"{FRAME_TOLERANCE}, {STATE_TOLERANCE_M * 1000:.0f} mm)")
        raise SourceRefused(f"{episode.name}: no official initial state 0-{len(candidates) - 1} of {episode.suite} "
                            f"task {episode.task_id} renders its first frame with the arm where it starts (closest "
                            f"frame: state {closest[1]}, mean difference {closest[0]:.1f} of 255, tolerance "
                            f"{FRAME_TOLERANCE})")
    scene = "its recorded simulator state" if state is None else f"initial state {state}"
    observation = start(state)
    for t, action in enumerate(episode.actions):
        position = np.asarray(observation["robot0_eef_pos"])
        error = float(np.linalg.norm(position - episode.states[t, EEF_POSITION]))
        if error > STATE_TOLERANCE_M:
            raise SourceRefused(f"{episode.name}: its replay from {scene} leaves the recorded path at step {t} (end "
                                f"effector {error * 1000:.1f} mm away, tolerance {STATE_TOLERANCE_M * 1000:.0f} mm): "
                                f"its actions do not reproduce its states")
        if t in episode.checked_frames:
            difference = frame_difference(frame(observation), episode.checked_frames[t])
            if difference > FRAME_TOLERANCE:
                raise SourceRefused(f"{episode.name}: its replay from {scene} renders frame {t} {difference:.1f} of "
                                    f"255 away from the recorded one (tolerance {FRAME_TOLERANCE})")
        observation = step(action, t + 1 in episode.checked_frames)
    hold = np.concatenate([np.zeros(6), episode.actions[-1, 6:]]).astype(np.float32)
    for _ in range(GRACE_STEPS):  # a recording that ended on its success step may settle a step or two later here
        if succeeded():
            break
        step(hold, False)
    if not succeeded():
        raise SourceRefused(f"{episode.name}: its replay from {scene} does not reach the goal (within "
                            f"{GRACE_STEPS} steps of holding still after its last action)")
    start(state)
    return Recovered(state, poses())
