"""Paraphrased instructions for training (`data.paraphrase_prob`): the same request in other words.

A policy trained on one phrasing per task learns that phrasing, not the request: asked "put the bowl on the
plate" instead of "pick up the black bowl ... and place it on the plate", it falls back to what the scene looked
like. This module rewrites pick-and-place instructions (LIBERO's "pick up OBJECT and place it on|in TARGET", and
the generator's phrasings of it) with other verbs and other ways of saying where the object is, keeping every
word that tells which object and which target: the object's landmarks and the target are never changed.
Instructions of any other form have no paraphrases and are kept as they are.
"""

from __future__ import annotations

import re

import numpy as np

_PICK_PLACE = re.compile(r"^(?:pick up|pick|grab|take) (?P<object>the .+?) and (?:place|put) it "
                         r"(?P<relation>on|onto|in|into) (?P<target>the .+)$")
# how the object is named: "the black bowl next to the ramekin" -> the noun phrase and where it is
_LOCATED = re.compile(r"^(?P<noun>the [a-z ]+?) (?P<where>(?:next to|on|in|at|between|from|near|inside) .+)$")
_WHERE_SAYINGS = {  # more ways of saying the same place; keys are matched at the start of the place phrase
    "next to ": ("beside ", "by ", "right next to "),
    "on the ": ("on top of the ", "sitting on the "),
    "from table center": ("at the center of the table", "in the middle of the table"),
}
_SIDES = re.compile(r"^on the (left|right|front|back)\b")  # "on the left" names a side, not a support
# {o}: the object, {r}: on/in, {t}: the target. In the short forms the object's place would run into the
# destination ("put the bowl on the stove on the plate" first reads as "put it on the stove"), so there the place is
# said as "that is ...", and the long forms ("... and place it") keep the object's phrase apart from the target.
_LONG_FORMS = (
    "pick up {o} and place it {r} {t}",
    "pick up {o} and put it {r} {t}",
    "grab {o} and place it {r} {t}",
    "take {o} and set it down {r} {t}",
    "pick {o} up and put it {r} {t}",
    "lift {o} and place it {r} {t}",
)
_SHORT_FORMS = (
    "put {o} {r} {t}",
    "place {o} {r} {t}",
    "move {o} {r_to} {t}",
    "please put {o} {r} {t}",
)


def _object_sayings(phrase: str) -> tuple[list[str], list[str]]:
    """The ways of saying `phrase` that keep its noun and its landmarks: (for the long forms, for the short forms)."""
    located = _LOCATED.match(phrase)
    if located is None:
        return [phrase], [phrase]
    noun, where = located["noun"], located["where"]
    long = [phrase]
    if not _SIDES.match(where):
        for start, others in _WHERE_SAYINGS.items():
            if where.startswith(start):
                long += [f"{noun} {other}{where[len(start):]}" for other in others]
    if where.startswith("from "):  # "from table center": said as a place of its own
        where = _WHERE_SAYINGS["from table center"][0] if where == "from table center" else where
    short = [f"{noun} that is {where}"]
    long.append(short[0])
    return long, short


def paraphrases(instruction: str) -> list[str]:
    """Every paraphrase of `instruction` (itself excluded), in a fixed order; [] for an instruction that is not one
    pick-and-place request."""
    said = " ".join(instruction.strip().lower().split())
    request = _PICK_PLACE.match(said)
    if request is None:
        return []
    relation = "in" if request["relation"] in ("in", "into") else "on"
    words = {"r": relation, "r_to": "into" if relation == "in" else "onto", "t": request["target"]}
    long, short = _object_sayings(request["object"])
    found: list[str] = []
    for forms, phrases in ((_LONG_FORMS, long), (_SHORT_FORMS, short)):
        for phrase in phrases:
            for form in forms:
                text = form.format(o=phrase, **words)
                if text != said and text not in found:
                    found.append(text)
    return found


def paraphrased(instruction: str, probability: float, key: tuple[int, ...]) -> str:
    """`instruction`, or with `probability` one of its paraphrases: a pure function of (`instruction`, `key`), so
    a frame gets the same words in every run and every worker (`key`: the seed, the episode, the frame)."""
    if probability <= 0:
        return instruction
    rng = np.random.default_rng(key)
    if rng.random() >= probability:
        return instruction
    options = paraphrases(instruction)
    return options[int(rng.integers(len(options)))] if options else instruction
