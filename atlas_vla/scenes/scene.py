"""A live LIBERO scene as objects on a table: where each movable object is, how much room it takes, what it rests
on, and how to move it.

Poses are world-frame positions (metres) and unit quaternions `(w, x, y, z)` of an object's root body. Sizes are
horizontal bounding radii about that body's origin, from the collision geometry MuJoCo holds (bounding spheres of
the geoms, so never an underestimate). What an object rests on is read from the contacts MuJoCo reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# how LIBERO's instructions name an object category (the rest: the category with spaces, e.g. "plate")
SPOKEN_NAMES = {"akita_black_bowl": "black bowl", "glazed_rim_porcelain_ramekin": "ramekin", "cookies": "cookie box",
                "flat_stove": "stove", "new_salad_dressing": "salad dressing", "chocolate_pudding": "chocolate pudding"}
REST_SPEED, REST_SPIN = 0.01, 0.1  # m/s and rad/s under which an object is at rest (`Scene.moving`)
# an outline seen from above whose reach from the origin varies by less than this share over all directions is round
# of the largest (a ring of 16 boxes, as LIBERO's bowls and plates collide, varies by about 2%; a square by 29%)
ROUND_TOLERANCE = 0.1
# how they name a fixture's regions that hold things inside ("in the top drawer of the wooden cabinet"; the rest: the
# region's name without "_region", e.g. "heating" for a microwave's heating_region)
SPOKEN_REGIONS = {"top_region": "top drawer", "middle_region": "middle drawer", "bottom_region": "bottom drawer"}


@dataclass(frozen=True)
class Pose:
    """A rigid body's position (3,) and orientation, a unit quaternion (w, x, y, z)."""

    position: tuple[float, float, float]
    quaternion: tuple[float, float, float, float]

    def as_list(self) -> list[float]:
        return [*self.position, *self.quaternion]

    @staticmethod
    def from_list(values: Any) -> "Pose":
        values = [float(v) for v in values]
        return Pose(tuple(values[:3]), tuple(values[3:7]))  # type: ignore[arg-type]

    def yaw(self) -> float:
        """The heading of the body's x axis about the world's vertical."""
        w, x, y, z = self.quaternion
        return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))

    def up(self) -> np.ndarray:
        """The body's z axis in the world frame (its tilt)."""
        w, x, y, z = self.quaternion
        return np.array([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)])


def yaw_quaternion(angle: float) -> np.ndarray:
    """A rotation by `angle` about the world's vertical, as (w, x, y, z)."""
    return np.array([np.cos(angle / 2), 0.0, 0.0, np.sin(angle / 2)])


def quaternion_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The rotation `a` after `b`, both (w, x, y, z)."""
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


class Scene:
    """The objects and fixtures of a live LIBERO environment (`OffScreenRenderEnv`)."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.inner = env.env
        self.objects: list[str] = list(self.inner.objects_dict)  # movable: each has one free joint
        self.fixtures: list[str] = list(self.inner.fixtures_dict)
        self._radii: dict[str, float] = {}
        self._round: dict[str, bool] = {}

    @property
    def sim(self) -> Any:
        """The environment's MuJoCo simulation (a reset may replace it: never kept)."""
        return self.inner.sim

    def _model(self, name: str) -> Any:
        return self.inner.objects_dict.get(name) or self.inner.fixtures_dict[name]

    def category(self, name: str) -> str:
        """The object's kind (`akita_black_bowl`, `plate`, ...): objects of one kind look alike."""
        return str(self._model(name).category_name)

    def spoken(self, name: str) -> str:
        """The object's kind as LIBERO's instructions say it ("black bowl", "cookie box")."""
        category = self.category(name)
        return SPOKEN_NAMES.get(category, category.replace("_", " "))

    def body(self, name: str) -> int:
        return self.sim.model.body_name2id(self._model(name).root_body)

    def pose(self, name: str) -> Pose:
        """Where the object is now (its root body in the world)."""
        body = self.body(name)
        return Pose(tuple(float(v) for v in self.sim.data.body_xpos[body]),  # type: ignore[arg-type]
                    tuple(float(v) for v in self.sim.data.body_xquat[body]))

    def poses(self) -> dict[str, Pose]:
        return {name: self.pose(name) for name in self.objects}

    def set_pose(self, name: str, pose: Pose) -> None:
        """Put a movable object at `pose`, at rest (its free joint's position and zero velocity)."""
        joint = self.inner.objects_dict[name].joints[-1]
        start, end = self.sim.model.get_joint_qpos_addr(joint)
        self.sim.data.qpos[start:end] = pose.as_list()
        start, end = self.sim.model.get_joint_qvel_addr(joint)
        self.sim.data.qvel[start:end] = 0.0

    def _subtree_bodies(self, name: str) -> list[int]:
        root, parents = self.body(name), self.sim.model.body_parentid
        bodies = [root]
        for body in range(root + 1, self.sim.model.nbody):
            if parents[body] in bodies:
                bodies.append(body)
        return bodies

    def _geoms(self, name: str) -> list[int]:
        """The collision geoms of an object or fixture (visual meshes collide with nothing)."""
        model, bodies = self.sim.model, set(self._subtree_bodies(name))
        return [g for g in range(model.ngeom) if model.geom_bodyid[g] in bodies
                and (model.geom_contype[g] or model.geom_conaffinity[g])]

    def radius(self, name: str) -> float:
        """The horizontal room the object takes about its origin (metres)."""
        if name not in self._radii:
            model, data = self.sim.model, self.sim.data
            centre = data.body_xpos[self.body(name)][:2]
            self._radii[name] = max((float(np.linalg.norm(data.geom_xpos[g][:2] - centre) + model.geom_rbound[g])
                                     for g in self._geoms(name)), default=0.0)
        return self._radii[name]

    def is_round(self, name: str) -> bool:
        """Whether the object looks the same at every heading: its collision outline seen from above (the corners of
        its geoms' bounding boxes) is a circle about its origin, as the ring of boxes a bowl, a plate or a ramekin
        collides with; not a box. A camera cannot tell how far such an object was turned."""
        if name not in self._round:
            data, geoms = self.sim.data, self._geoms(name)
            if not geoms:  # no outline to judge: carried with its heading, as any other object
                self._round[name] = False
                return False
            body = self.body(name)
            points = np.concatenate([self._outline(g) for g in geoms])
            local = (points - data.body_xpos[body]) @ data.body_xmat[body].reshape(3, 3)  # in the object's own frame
            angles = np.linspace(0.0, 2 * np.pi, 72, endpoint=False)
            reach = (local[:, :2] @ np.stack([np.cos(angles), np.sin(angles)])).max(axis=0)
            self._round[name] = bool(reach.min() > 0 and reach.max() - reach.min() <= ROUND_TOLERANCE * reach.max())
        return self._round[name]

    def _outline(self, geom: int) -> np.ndarray:
        """The world corners of the geom's bounding box: a box's own corners; a cylinder or a mesh reads as its box,
        so an object made of one alone is never taken for round."""
        model, data = self.sim.model, self.sim.data
        centre, half = model.geom_aabb[geom][:3], model.geom_aabb[geom][3:]
        local = centre + np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * half
        return data.geom_xpos[geom] + local @ data.geom_xmat[geom].reshape(3, 3).T

    def supports(self) -> dict[str, str | None]:
        """What each movable object rests on: another object or a fixture it touches from above, or None (the table
        or the floor)."""
        data = self.sim.data
        owner = {g: name for name in [*self.objects, *self.fixtures] for g in self._geoms(name)}
        found: dict[str, str | None] = {name: None for name in self.objects}
        for contact in data.contact[:data.ncon]:
            a, b = owner.get(contact.geom1), owner.get(contact.geom2)
            if a is None or b is None or a == b or abs(contact.frame[2]) < 0.7:  # side by side is no support
                continue
            for upper, lower in ((a, b), (b, a)):
                if upper in found and data.body_xpos[self.body(upper)][2] > data.body_xpos[self.body(lower)][2]:
                    found[upper] = lower if found[upper] is None or self._higher(lower, found[upper]) else found[upper]
        return found

    def place(self, name: str, support: str) -> str:
        """Where `name` is on or in the fixture or object `support` it rests on, as LIBERO's instructions say it: "in
        the top drawer of the wooden cabinet" when a region of `support` contains it and it is not on that region
        (LIBERO's own `In` and `On` predicates), else "on the wooden cabinet"."""
        for region in self.inner.object_sites_dict:
            if not region.startswith(support + "_") or region not in self.inner.object_states_dict:
                continue
            inside = self.inner._eval_predicate(["in", name, region])
            if inside and not self.inner._eval_predicate(["on", name, region]):
                part = region[len(support) + 1:]
                spoken = SPOKEN_REGIONS.get(part, part.removesuffix("_region").replace("_", " "))
                return f"in the {spoken} of the {self.spoken(support)}"
        return f"on the {self.spoken(support)}"

    def touching(self) -> list[tuple[str, str]]:
        """The pairs of movable objects in contact, whichever way (a bowl leaning on a ramekin, its rim on the
        table), each once."""
        data = self.sim.data
        owner = {g: name for name in self.objects for g in self._geoms(name)}
        pairs = {tuple(sorted((owner[c.geom1], owner[c.geom2]))) for c in data.contact[:data.ncon]
                 if c.geom1 in owner and c.geom2 in owner and owner[c.geom1] != owner[c.geom2]}
        return sorted(pairs)  # type: ignore[arg-type]

    def moving(self, speed: float = REST_SPEED, spin: float = REST_SPIN) -> list[str]:
        """The movable objects still in motion: faster than `speed` (m/s) or turning faster than `spin` (rad/s)."""
        found = []
        for name in self.objects:
            start, end = self.sim.model.get_joint_qvel_addr(self.inner.objects_dict[name].joints[-1])
            velocity = self.sim.data.qvel[start:end]
            if np.linalg.norm(velocity[:3]) > speed or np.linalg.norm(velocity[3:]) > spin:
                found.append(name)
        return found

    def _higher(self, a: str, b: str) -> bool:
        return bool(self.sim.data.body_xpos[self.body(a)][2] > self.sim.data.body_xpos[self.body(b)][2])

    def robot_base(self) -> np.ndarray:
        """The robot's base position in the world."""
        return np.array(self.sim.data.body_xpos[self.sim.model.body_name2id(self.inner.robots[0].robot_model.root_body)])

    def goal(self) -> "Goal":
        """The task's goal; `ValueError` naming it when it is not one pick-and-place (`On`, `In`), the goals that
        re-targeting knows how to move."""
        goals = self.inner.parsed_problem["goal_state"]
        if len(goals) != 1 or len(goals[0]) != 3 or goals[0][0].lower() not in ("on", "in"):
            shown = " and ".join("(" + " ".join(goal) + ")" for goal in goals)
            raise ValueError(f"the goal {shown} is not one pick-and-place (On or In): only those can be re-targeted")
        predicate, obj, region = goals[0]
        return Goal(predicate.lower(), obj, region, self._owner_of_region(region))

    def _owner_of_region(self, name: str) -> str:
        """`basket_1_contain_region` -> `basket_1`: an `In` goal names a region of the target object."""
        if name in self.inner.objects_dict or name in self.inner.fixtures_dict:
            return name
        for owner in [*self.objects, *self.fixtures]:
            if name.startswith(owner + "_"):
                return owner
        raise ValueError(f"the goal's target {name} is no object or fixture of the scene")


@dataclass(frozen=True)
class Goal:
    """A pick-and-place goal: `predicate` (`on`, `in`) holds between `obj` and `region` (the BDDL's words), a
    region of the object or fixture `target` (the object itself for `on`)."""

    predicate: str
    obj: str
    region: str
    target: str

    def retargeted(self, obj: str) -> "Goal":
        """The same goal for another object (of the same kind, in the same scene)."""
        return Goal(self.predicate, obj, self.region, self.target)

    def holds(self, scene: Scene) -> bool:
        """Whether it holds now, by LIBERO's own predicate (for any object, not only the task's)."""
        return bool(scene.inner._eval_predicate([self.predicate, self.obj, self.region]))
