"""Instructions that name the goal's object unambiguously in the scene as it is laid out, in LIBERO's phrasing.

A scene with two black bowls says which one to move by where it is ("the black bowl on the cookie box", "the
black bowl next to the ramekin"). Once objects move, the source's words may no longer be true, so the phrase is
computed from the simulator's poses:

- an object that is the only one of its kind needs no phrase: the source's instruction stays as it is;
- else "on the X" when it rests on X, or "in the top drawer of the X" when a region of X holds it, and nothing of
  its kind is there;
- else "next to the X" for the nearest landmark X (another kind of object, or a fixture) within `NEXT_TO_M` of it
  (between footprints), when every other object of its kind is at least `MARGIN_M` farther from X;
- else no phrase is unambiguous and the layout is not used (`Ambiguous`).

The instruction is then "pick up the <kind> <phrase> and place it <on|in> the <target>", LIBERO's pick-and-place
sentence.
"""

from __future__ import annotations

import numpy as np

from atlas_vla.scenes.scene import Goal, Scene

NEXT_TO_M = 0.10
MARGIN_M = 0.08


class Ambiguous(RuntimeError):
    """No phrase names the goal's object alone in this layout."""


def same_kind(scene: Scene, name: str) -> list[str]:
    """The other movable objects of `name`'s kind (the other black bowl)."""
    return [other for other in scene.objects if other != name and scene.category(other) == scene.category(name)]


def _gap(scene: Scene, a: str, b: str) -> float:
    """The horizontal distance between two footprints (negative where they overlap)."""
    centres = [np.asarray(scene.sim.data.body_xpos[scene.body(n)][:2]) for n in (a, b)]
    return float(np.linalg.norm(centres[0] - centres[1]) - scene.radius(a) - scene.radius(b))


def location(scene: Scene, name: str) -> str | None:
    """The phrase that singles `name` out among the objects of its kind ("on the cookie box", "next to the
    ramekin"); None when it is the only one of its kind; `Ambiguous` when no phrase does."""
    others = same_kind(scene, name)
    if not others:
        return None
    supports = scene.supports()
    support = supports[name]
    if support is not None:
        place = scene.place(name, support)
        if all(supports[other] != support or scene.place(other, support) != place for other in others):
            return place
    kind = scene.category(name)
    landmarks = [n for n in [*scene.objects, *scene.fixtures] if n != name and scene.category(n) != kind]
    for landmark in sorted(landmarks, key=lambda n: _gap(scene, name, n)):
        gap = _gap(scene, name, landmark)
        if gap > NEXT_TO_M:
            break
        if all(_gap(scene, other, landmark) >= gap + MARGIN_M for other in others):
            return f"next to the {scene.spoken(landmark)}"
    raise Ambiguous(f"no phrase names {name} alone among the objects of its kind ({', '.join(others)})")


def instruction(scene: Scene, goal: Goal, source: str) -> str:
    """The instruction for `goal` in the scene as it is now: `source` itself when the goal's object is the only one
    of its kind and the goal is the source's, else LIBERO's pick-and-place sentence with the object's phrase."""
    phrase = location(scene, goal.obj)
    if phrase is None and same_kind(scene, goal.target) == []:
        return source
    where = "in" if goal.predicate == "in" else "on"
    named = f"{scene.spoken(goal.obj)} {phrase}" if phrase else scene.spoken(goal.obj)
    return f"pick up the {named} and place it {where} the {scene.spoken(goal.target)}"
