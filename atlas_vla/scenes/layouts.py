"""New layouts of a LIBERO scene: the movable objects placed collision-free at sampled positions and headings over
the table area the arm reaches, then left to settle.

What moves: every object that rests on the table (or the floor), carrying whatever rests on it (a bowl on the
cookie box moves with the box) or leans on it (a tilted object moves with what it touches); objects inside or on a
fixture (a bowl in the cabinet, on the stove) stay, as does what leans on them, and the fixtures. Each moved group
gets a centre drawn uniformly over `REACH` (a box in front of the robot's base, far larger than LIBERO's
few-centimetre placement regions) and a heading turned by up to `max_yaw` from the one it had; a
group's footprint (the bounding radii of its objects, `Scene.radius`) keeps `clearance` from every other footprint
and fixture. After the physics settles, a layout in which something tipped, fell or slid is rejected.

Layouts come from a seed alone, so a layout is reproduced from its record (`Layout`); the seeds of generation, of
rendered scenes and of evaluation (`eval-libero --layouts random`) are drawn in separate streams (`PURPOSES`), so no
evaluated layout is one a training run saw, whatever seeds they were given.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from atlas_vla.scenes.scene import Pose, Scene, quaternion_multiply, yaw_quaternion

# the area object centres are drawn from, relative to the robot's base (metres): x forward, y to the left
REACH = {"x": (0.38, 0.78), "y": (-0.32, 0.32)}
MAX_YAW = np.pi / 4  # heading change per object: a grasp re-targeted to it turns the wrist as much (not a round one's)
CLEARANCE = 0.01
SETTLE_STEPS = 10  # LIBERO's own settling after a reset
# settled, a moved object stays within these of where it was put, or the layout is rejected
MAX_SLIDE, MAX_DROP, MAX_TILT = 0.02, 0.02, np.radians(10)
PURPOSES = {"generation": 0, "evaluation": 1, "scenes": 2}  # separate seed streams: an evaluated layout is never one
# that generate-demos or render-scenes drew
ATTEMPTS = 10  # layouts drawn from one stream before it gives up (each rejected one costs a reset and a settle)


NOT_SETTLED, AMBIGUOUS = "layout did not settle", "no unambiguous instruction"


class LayoutImpossible(ValueError):
    """The objects do not fit in the area with the clearance asked for."""


class LayoutRejected(RuntimeError):
    """A layout that did not settle as placed (an object tipped, fell or slid)."""


@dataclass(frozen=True)
class Layout:
    """Where every moved object was put (before settling) and where the settled scene has them: its record."""

    seed: list[int]  # the random stream it was drawn from (`layout_rng`)
    placed: dict[str, Pose]
    settled: dict[str, Pose] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"seed": list(self.seed), "placed": {k: v.as_list() for k, v in self.placed.items()},
                "settled": {k: v.as_list() for k, v in self.settled.items()}}

    @staticmethod
    def from_record(record: Mapping[str, Any]) -> "Layout":
        return Layout(list(record["seed"]), {k: Pose.from_list(v) for k, v in record["placed"].items()},
                      {k: Pose.from_list(v) for k, v in record.get("settled", {}).items()})


def layout_rng(purpose: str, seed: int, suite: str, *keys: int) -> tuple[list[int], np.random.Generator]:
    """The random stream of one layout: `purpose` (a key of `PURPOSES`), the run's seed, the suite and what
    the layout is for (task, try or initial state): the same keys give the same layout, other purposes never do."""
    entropy = [PURPOSES[purpose], int(seed), zlib.crc32(suite.encode()), *map(int, keys)]
    return entropy, np.random.default_rng(entropy)


def _groups(scene: Scene) -> dict[str, list[str]]:
    """The objects that move together, by the one resting on the table: {root: [root, what rests on it, ...]}."""
    supports = scene.supports()
    groups: dict[str, list[str]] = {name: [name] for name, support in supports.items() if support is None}

    def root_of(name: str, seen: tuple[str, ...] = ()) -> str | None:
        support = supports.get(name)
        if support is None:
            return name
        if support not in supports or support in seen:  # on a fixture: stays where it is
            return None
        return root_of(support, (*seen, name))

    for name in supports:
        root = root_of(name)
        if root is not None and root != name:
            groups[root].append(name)
    poses = scene.poses()
    for a, b in scene.touching():  # a bowl leaning on a ramekin, its rim on the table: they move as one, or not at all
        roots = [next((root for root, members in groups.items() if name in members), None) for name in (a, b)]
        upright = all(np.dot(poses[name].up(), (0.0, 0.0, 1.0)) >= np.cos(MAX_TILT) for name in (a, b))
        if roots[0] == roots[1] or upright:  # upright side by side: each stands on its own
            continue
        if None in roots:
            for root in roots:
                groups.pop(root, None)  # type: ignore[arg-type]
        else:
            keep, merged = sorted(roots, key=lambda root: -scene.radius(root))  # type: ignore[arg-type]
            groups[keep] += groups.pop(merged)
    return groups


def sample_layout(scene: Scene, rng: np.random.Generator, seed: list[int], *, area: Mapping[str, tuple[float, float]]
                  = REACH, max_yaw: float = MAX_YAW, clearance: float = CLEARANCE, attempts: int = 50) -> Layout:
    """Draw new poses for the scene's movable groups (not applied: `apply_layout`). `LayoutImpossible`, naming the
    objects and the area, when `attempts` layouts in a row leave some group without room."""
    groups = _groups(scene)
    poses = scene.poses()
    base = scene.robot_base()[:2]
    low = base + np.array([area["x"][0], area["y"][0]])
    high = base + np.array([area["x"][1], area["y"][1]])
    fixed = [(np.array(scene.sim.data.body_xpos[scene.body(name)][:2]), scene.radius(name)) for name in scene.fixtures]
    moved = {member for members in groups.values() for member in members}
    fixed += [(np.array(poses[name].position[:2]), scene.radius(name)) for name in scene.objects if name not in moved]
    footprint = {root: max(np.linalg.norm(np.subtract(poses[m].position[:2], poses[root].position[:2])) + scene.radius(m)
                           for m in members) for root, members in groups.items()}
    order = sorted(groups, key=lambda root: -footprint[root])
    for _ in range(attempts):
        taken = list(fixed)
        placed: dict[str, Pose] = {}
        for root in order:
            spot = _free_spot(rng, low, high, footprint[root], taken, clearance)
            if spot is None:
                break
            taken.append((spot, footprint[root]))
            turn = float(rng.uniform(-max_yaw, max_yaw))
            placed.update(_move_group(poses, groups[root], root, spot, turn))
        else:
            return Layout(seed, placed)
    names = ", ".join(f"{root} ({footprint[root]:.3f} m)" for root in order)
    raise LayoutImpossible(f"cannot place {names} collision-free with {clearance} m clearance in x {low[0]:.2f}.."
                           f"{high[0]:.2f}, y {low[1]:.2f}..{high[1]:.2f} (and clear of the fixtures): {attempts} "
                           f"layouts in a row left no room; widen the area or move fewer objects")


def _free_spot(rng: np.random.Generator, low: np.ndarray, high: np.ndarray, radius: float,
               taken: list[tuple[np.ndarray, float]], clearance: float, tries: int = 200) -> np.ndarray | None:
    for _ in range(tries):
        spot = rng.uniform(low, high)
        if all(np.linalg.norm(spot - centre) >= radius + other + clearance for centre, other in taken):
            return spot
    return None


def _move_group(poses: Mapping[str, Pose], members: list[str], root: str, spot: np.ndarray, turn: float
                ) -> dict[str, Pose]:
    """The group's poses turned by `turn` about the root's vertical axis and moved so that the root is at `spot`."""
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    origin = np.array(poses[root].position[:2])
    turned = yaw_quaternion(turn)
    moved = {}
    for name in members:
        pose = poses[name]
        xy = spot + rotation @ (np.array(pose.position[:2]) - origin)
        quaternion = quaternion_multiply(turned, np.array(pose.quaternion))
        moved[name] = Pose((float(xy[0]), float(xy[1]), pose.position[2]),
                           tuple(float(v) for v in quaternion / np.linalg.norm(quaternion)))  # type: ignore[arg-type]
    return moved


def apply_layout(scene: Scene, layout: Layout, settle: Callable[[], Any]) -> tuple[Any, Layout]:
    """Put the objects where `layout` places them and let the physics settle (`settle()` steps the environment
    `SETTLE_STEPS` times holding the arm still and returns the last observation). Returns that observation and the
    layout with its settled poses; `LayoutRejected` naming the object that did not stay put."""
    for name, pose in layout.placed.items():
        scene.set_pose(name, pose)
    scene.sim.forward()
    observation = settle()
    settled = {name: scene.pose(name) for name in layout.placed}
    for name, pose in layout.placed.items():
        now = settled[name]
        slide = float(np.linalg.norm(np.subtract(now.position[:2], pose.position[:2])))
        drop = pose.position[2] - now.position[2]
        tilt = float(np.arccos(np.clip(np.dot(now.up(), pose.up()), -1.0, 1.0)))
        if slide > MAX_SLIDE or drop > MAX_DROP or tilt > MAX_TILT:
            raise LayoutRejected(f"{name} did not settle where it was placed (slid {slide:.3f} m, dropped "
                                 f"{drop:.3f} m, tilted {np.degrees(tilt):.0f} degrees)")
    return observation, Layout(layout.seed, layout.placed, settled)


def first_usable(scene: Scene, rng: np.random.Generator, seed: list[int], start: Callable[[], Any],
                 settle: Callable[[], Any], describe: Callable[[], str]) -> tuple[Any, Layout, str, dict[str, int]]:
    """The first layout of the stream `rng` that settles and in which `describe()` can name the goal's object (it
    raises `instructions.Ambiguous` where it cannot), each drawn from the scene `start()` resets to: (the settled
    observation, the layout, the instruction, the rejections by reason). `LayoutRejected` after `ATTEMPTS` draws."""
    from atlas_vla.scenes.instructions import Ambiguous

    rejected: dict[str, int] = {}
    for _ in range(ATTEMPTS):
        start()
        try:
            observation, layout = apply_layout(scene, sample_layout(scene, rng, seed), settle)
            return observation, layout, describe(), rejected
        except (LayoutRejected, Ambiguous) as error:
            reason = NOT_SETTLED if isinstance(error, LayoutRejected) else AMBIGUOUS
            rejected[reason] = rejected.get(reason, 0) + 1
    raise LayoutRejected(f"no usable layout in {ATTEMPTS} draws ({', '.join(f'{k}: {v}' for k, v in rejected.items())})")
