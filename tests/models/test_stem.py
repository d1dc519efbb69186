"""The pixel stem (`models.stem`, `model.pixel_stem`): a trainable view of each image's pixels on the fusion's grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import synthetic_dataset, tiny_policy_config

from atlas_vla.constants import OBJECT_POSITIONS, OBS_IMAGES, OBS_VISION_FEATURES
from atlas_vla.data.normalization import compute_norm_stats
from atlas_vla.data.samples import LiberoSamples, collate
from atlas_vla.data.sources import load_libero
from atlas_vla.models.policy import AtlasPolicy
from atlas_vla.models.stem import PixelStem


def test_each_grid_cell_of_the_stem_sees_its_own_part_of_each_image():
    """Features (B, S, rows * columns, dim), row by row: a change in the top-right corner of view 1 changes only that
    view's top-right cell. A fresh stem gives zeros, so it adds nothing until it trains."""
    torch.manual_seed(0)
    stem = PixelStem(8, (3, 4))
    images = torch.randint(0, 256, (2, 2, 3, 56, 56), dtype=torch.uint8)
    tokens, cells = stem(images)
    assert torch.equal(tokens, torch.zeros(2, 2, 12, 8)) and cells.shape == (2, 2, 12, PixelStem.channels)
    torch.nn.init.normal_(stem.project.weight)
    torch.testing.assert_close(stem(images)[0], stem.project(cells))
    images[:, 1, :, :6, -6:] = 255 - images[:, 1, :, :6, -6:]
    changed = (stem(images)[1] - cells).abs().amax(dim=-1) > 1e-6  # (B, S, 12)
    assert changed[:, 1, 3].all() and changed.sum() == 2  # row 0, column 3 of view 1, in both samples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = load_libero(str(synthetic_dataset(tmp_path_factory.mktemp("data"))))
    spec = tiny_policy_config().sample_spec
    return data, compute_norm_stats(data), collate([LiberoSamples(data, spec)[i] for i in range(6)])


def stem_policy(stats) -> AtlasPolicy:
    torch.manual_seed(0)
    return AtlasPolicy(tiny_policy_config(pixel_stem=True), stats)


def test_the_policy_adds_the_stems_features_to_each_views_patch_tokens_and_trains_them(setup):
    """What the fusion's encoder reads changes by exactly the stem's features, at each view's patch tokens (not at the
    camera tokens, nor the language and state tokens); the loss reaches the stem's convolutions."""
    _, stats, batch = setup
    policy = stem_policy(stats)
    inputs, features = [], []
    hooks = [policy.fusion.encoder.register_forward_pre_hook(lambda module, args: inputs.append(args[0])),
             policy.stem.register_forward_hook(lambda module, args, output: features.append(output[0]))]
    with torch.no_grad():
        policy(batch)
        torch.nn.init.normal_(policy.stem.project.weight, std=0.1)
        policy(batch)
    for hook in hooks:
        hook.remove()
    B, S = batch[OBS_IMAGES].shape[:2]
    T = policy.fusion.tokens_per_view
    assert torch.equal(features[0], torch.zeros_like(features[0]))  # fresh: as if there were no stem
    added = (inputs[1] - inputs[0])[:, :S * T].view(B, S, T, -1)
    torch.testing.assert_close(added[:, :, 1:], features[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(added[:, :, 0], torch.zeros_like(added[:, :, 0]))
    assert torch.equal(inputs[1][:, S * T:], inputs[0][:, S * T:])
    policy.zero_grad()
    policy(batch)["loss"].backward()
    assert policy.stem.convolutions[0].weight.grad.abs().sum() > 0
    policy.zero_grad()


def test_a_spatial_read_out_reads_the_stems_cells_of_the_current_agent_view(setup):
    """With `locate_readout: spatial`, the locator gets the stem's cells of view 0 (the current agent view), and the
    locate loss reaches the stem's convolutions through them."""
    _, stats, batch = setup
    torch.manual_seed(0)
    policy = AtlasPolicy(tiny_policy_config(pixel_stem=True, locate_weight=1.0, locate_readout="spatial"), stats)
    given, made = [], []
    policy.locator.register_forward_pre_hook(lambda module, args: given.append(args[2]))
    policy.stem.register_forward_hook(lambda module, args, output: made.append(output[1]))
    batch = {**batch, OBJECT_POSITIONS: torch.linspace(-0.3, 0.9, 36).reshape(6, 6)}
    losses = policy(batch)
    assert torch.equal(given[0], made[0][:, 0])
    losses["locate_loss"].backward()
    assert policy.stem.convolutions[0].weight.grad.abs().sum() > 0


def test_a_saved_policy_with_a_stem_acts_the_same_and_a_batch_without_images_is_refused(setup, tmp_path):
    data, stats, batch = setup
    policy = stem_policy(stats)
    with torch.no_grad():
        torch.nn.init.normal_(policy.stem.project.weight, std=0.1)
    observation = {"agentview_image": np.asarray(data[0]["observation.images.agentview"]),
                   "wrist_image": np.asarray(data[0]["observation.images.wrist"]),
                   "state": np.asarray(data[0]["observation.state"], np.float32),
                   "task_description": data[0]["instruction"]}
    loaded = AtlasPolicy.from_pretrained(policy.save_pretrained(tmp_path / "policy"), norm_stats=stats)
    torch.testing.assert_close(loaded.stem.project.weight, policy.stem.project.weight)
    np.testing.assert_allclose(loaded.predict_action(observation), policy.predict_action(observation), atol=1e-6)
    stored = {**batch, OBS_VISION_FEATURES: policy.vision_features(batch[OBS_IMAGES])}
    del stored[OBS_IMAGES]
    with pytest.raises(ValueError, match="model.pixel_stem reads the camera images, and this batch has none"):
        policy(stored)
    assert AtlasPolicy(tiny_policy_config(), stats).stem is None
