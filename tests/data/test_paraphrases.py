"""Paraphrased instructions (`data.paraphrase_prob`): other words for the same request, in training only."""

from __future__ import annotations

import re

import pytest

from atlas_vla.constants import INSTRUCTION
from atlas_vla.data.config import DataConfig
from atlas_vla.data.paraphrases import paraphrased, paraphrases
from atlas_vla.data.samples import build_samples
from atlas_vla.data.sources import load_libero
from atlas_vla.data.spec import SampleSpec

LIBERO_SPATIAL = [  # LIBERO's phrasing, and the generator's ("on the X", "next to the X")
    ("pick up the black bowl between the plate and the ramekin and place it on the plate",
     ["the plate and the ramekin"], "the plate"),
    ("pick up the black bowl next to the ramekin and place it on the plate", ["the ramekin"], "the plate"),
    ("pick up the black bowl from table center and place it on the plate", ["table"], "the plate"),
    ("pick up the black bowl on the cookie box and place it on the plate", ["the cookie box"], "the plate"),
    ("pick up the black bowl in the top drawer of the wooden cabinet and place it on the plate",
     ["the top drawer of the wooden cabinet"], "the plate"),
    ("pick up the alphabet soup and place it in the basket", [], "the basket"),
    ("pick up the black bowl on the left and put it in the tray", ["the left"], "the tray"),
]


@pytest.mark.parametrize("instruction, landmarks, target", LIBERO_SPATIAL)
def test_a_paraphrase_changes_the_words_but_keeps_the_object_its_landmarks_and_the_target(instruction, landmarks,
                                                                                         target):
    found = paraphrases(instruction)
    assert len(found) >= 8 and len(set(found)) == len(found) and instruction not in found
    relation = instruction.split(" it ")[-1].split(" ")[0]  # on / in
    onto = {"on": "onto", "in": "into"}[relation]
    noun = "the black bowl" if "bowl" in instruction else "the alphabet soup"
    for text in found:
        assert text.endswith(f" {relation} {target}") or text.endswith(f" {onto} {target}"), text
        assert noun in text, text
        assert all(landmark in text for landmark in landmarks), text
    verbs = {re.match(r"^(\w+)", text)[1] for text in found}
    assert len(verbs) >= 5  # not one verb with other fillers
    for text in found:  # a short form says the object's place as "that is ...": it never runs into the destination
        if re.match(r"^(put|place|move|please put) ", text) and landmarks:
            assert " that is " in text, text


def test_paraphrases_by_value():
    found = paraphrases("pick up the black bowl on the stove and place it on the plate")
    for expected in ("put the black bowl that is on the stove on the plate",
                     "move the black bowl that is on the stove onto the plate",
                     "grab the black bowl sitting on the stove and place it on the plate",
                     "take the black bowl on top of the stove and set it down on the plate"):
        assert expected in found
    for ambiguous in ("put the black bowl on the stove on the plate", "place the black bowl on the stove on the plate"):
        assert ambiguous not in found
    assert "pick up the black bowl at the center of the table and place it on the plate" in paraphrases(
        "pick up the black bowl from table center and place it on the plate")
    sides = paraphrases("pick up the black bowl on the left and put it in the tray")
    assert "put the black bowl that is on the left in the tray" in sides
    assert not any("on top of the left" in text or "sitting on the left" in text for text in sides)
    assert paraphrases("pick up the alphabet soup and place it in the basket")[:3] == [
        "pick up the alphabet soup and put it in the basket", "grab the alphabet soup and place it in the basket",
        "take the alphabet soup and set it down in the basket"]


def test_other_requests_have_no_paraphrase_and_keep_their_words():
    for instruction in ("open the top drawer of the cabinet", "turn on the stove",
                        "put both the alphabet soup and the tomato sauce in the basket"):
        assert paraphrases(instruction) == []
        assert paraphrased(instruction, 1.0, (0, 1, 2)) == instruction


def test_the_draw_is_a_function_of_the_frame_and_the_probability_is_respected():
    instruction = LIBERO_SPATIAL[0][0]
    draws = [paraphrased(instruction, 0.5, (0, 0, frame)) for frame in range(400)]
    assert draws == [paraphrased(instruction, 0.5, (0, 0, frame)) for frame in range(400)]  # same key, same words
    changed = sum(text != instruction for text in draws)
    assert 150 < changed < 250
    assert set(draws) - {instruction} <= set(paraphrases(instruction))
    assert len(set(draws)) > 10
    assert draws != [paraphrased(instruction, 0.5, (1, 0, frame)) for frame in range(400)]  # another seed
    assert all(paraphrased(instruction, 0.0, (0, 0, frame)) == instruction for frame in range(50))
    assert all(paraphrased(instruction, 1.0, (0, 0, frame)) != instruction for frame in range(50))


def test_only_training_samples_are_paraphrased(sim_demos_dir):
    dataset = load_libero(str(sim_demos_dir), max_episodes=2)
    spec = SampleSpec(image_size=56)
    config = DataConfig(source=str(sim_demos_dir), paraphrase_prob=0.5)
    recorded = [row for row in dataset[INSTRUCTION]]
    train = build_samples(dataset, spec, config, train=True).without_images()
    seen = [sample[INSTRUCTION] for sample in train.__getitems__(list(range(len(train))))]
    assert seen == [sample[INSTRUCTION] for sample in train.__getitems__(list(range(len(train))))]
    changed = [(was, now) for was, now in zip(recorded, seen) if was != now]
    assert 0.3 * len(seen) < len(changed) < 0.7 * len(seen)
    assert all(now in paraphrases(was) for was, now in changed)
    validation = build_samples(dataset, spec, config, train=False).without_images()
    assert [s[INSTRUCTION] for s in validation.__getitems__(list(range(len(validation))))] == recorded
    with pytest.raises(ValueError, match="paraphrase_prob must be in"):
        DataConfig(paraphrase_prob=1.5)
