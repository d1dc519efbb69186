"""The locate query's read-outs (`models.locator`) and how the policy wires the spatial one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import synthetic_dataset, tiny_policy_config

from atlas_vla.constants import OBJECT_POSITIONS
from atlas_vla.data.normalization import compute_norm_stats
from atlas_vla.data.samples import LiberoSamples, collate
from atlas_vla.data.sources import load_libero
from atlas_vla.models.locator import SpatialLocator
from atlas_vla.models.policy import AtlasPolicy


def pointing(dim: int = 4, grid: tuple[int, int] = (3, 4)) -> SpatialLocator:
    """A spatial locator whose object ask matches a key along axis 0, and whose target ask along axis 1, sharply."""
    locator = SpatialLocator(dim, grid)
    with torch.no_grad():
        locator.keys.weight.copy_(torch.eye(dim))
        locator.keys.bias.zero_()
        locator.asks.weight.zero_()
        locator.asks.bias.zero_()
        locator.asks.bias[0] = locator.asks.bias[dim + 1] = 60.0
    return locator


def test_the_spatial_read_out_finds_the_patch_each_thing_is_in_and_maps_it_to_the_world():
    """Each thing's attention over the patch grid (row by row) lands where its key is; the image position is that
    patch's centre (x, then y, in -1..1); the world position is `to_world` of it and of which thing it is, the
    feature's linear term added to the heights only. Moving the object's patch moves only the object's position."""
    locator = pointing()
    patches = torch.zeros(2, 12, 4)
    patches[0, 5, 0] = 1.0  # row 1, column 1: the object
    patches[0, 11, 1] = 1.0  # row 2, column 3: the target
    patches[1, 2, 0] = 1.0  # row 0, column 2
    patches[1, 11, 1] = 1.0
    feature = torch.zeros(2, 4)
    where = locator.image_positions(feature, patches)
    np.testing.assert_allclose(where[0].detach(), [[-1 / 3, 0.0], [1.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(where[1].detach(), [[1 / 3, -1.0], [1.0, 1.0]], atol=1e-6)
    located = locator(feature, patches)
    on_image = locator.to_world(torch.cat((where, torch.eye(2).expand(2, -1, -1)), dim=-1))  # (2, things, xyz)
    heights = locator.heights(feature)  # (2, things)
    expected = torch.cat((on_image[..., :2], on_image[..., 2:] + heights.unsqueeze(-1)), dim=-1).flatten(1)
    torch.testing.assert_close(located, expected)
    with torch.no_grad():
        locator.heights.bias.add_(torch.tensor([0.5, -0.25]))  # the feature's term moves heights and nothing else
    np.testing.assert_allclose((locator(feature, patches) - located).detach().view(2, 2, 3),
                               [[[0, 0, 0.5], [0, 0, -0.25]]] * 2, atol=1e-6)
    assert not torch.allclose(located[0, :3], located[1, :3]) and torch.allclose(located[0, 3:], located[1, 3:])
    even = locator.image_positions(feature[:1], torch.zeros(1, 12, 4))  # no patch stands out: the grid's middle
    np.testing.assert_allclose(even.detach(), np.zeros((1, 2, 2)), atol=1e-6)
    with pytest.raises(ValueError, match="expects 12 patch tokens, got 9"):
        locator(feature, torch.zeros(2, 9, 4))
    with pytest.raises(ValueError, match="reads the agent view's patch tokens"):
        locator(feature)


def test_with_stem_cells_each_things_attention_also_follows_what_the_cells_show():
    """`cell_dim`: each thing's logits add a linear map of the pixel stem's cell at each patch, so a cell that looks
    like the target draws the target's attention even where the patch tokens say nothing; cells are required exactly
    when the read-out was built for them."""
    locator = SpatialLocator(4, (3, 4), cell_dim=2)
    with torch.no_grad():
        for layer in (locator.asks, locator.keys):
            layer.weight.zero_()
            layer.bias.zero_()
        locator.looks.weight.copy_(torch.tensor([[0.0, 0.0], [60.0, 0.0]]))  # the target looks like channel 0
        locator.looks.bias.zero_()
    cells = torch.zeros(1, 12, 2)
    cells[0, 6, 0] = 1.0  # row 1, column 2
    where = locator.image_positions(torch.zeros(1, 4), torch.zeros(1, 12, 4), cells)
    np.testing.assert_allclose(where[0].detach(), [[0.0, 0.0], [1 / 3, 0.0]], atol=1e-6)  # the object: no cue
    with pytest.raises(ValueError, match="cells are read exactly when it was built with cell_dim"):
        locator(torch.zeros(1, 4), torch.zeros(1, 12, 4))
    with pytest.raises(ValueError, match="cells are read exactly when it was built with cell_dim"):
        pointing()(torch.zeros(1, 4), torch.zeros(1, 12, 4), cells)


def test_a_policy_with_the_spatial_read_out_reads_the_current_agent_views_patches_and_learns(tmp_path):
    """`locate_readout: spatial`: the locator gets the fused context's tokens of the current frame's agent view
    (after its camera token: `Fusion.view_patches`), its positions train on `OBJECT_POSITIONS` and reach the action
    queries with `locate_input`; a saved policy locates the same; the config refuses it without a locate query."""
    data = load_libero(str(synthetic_dataset(tmp_path)))
    stats = compute_norm_stats(data)
    torch.manual_seed(0)
    policy = AtlasPolicy(tiny_policy_config(locate_weight=1.0, locate_input=True, locate_readout="spatial"), stats)
    assert isinstance(policy.locator, SpatialLocator)
    grid = policy.fusion.token_grid
    assert policy.locator.centres.shape == (grid[0] * grid[1], 2)
    batch = collate([LiberoSamples(data, policy.config.sample_spec)[i] for i in range(8)])
    contexts, given = [], []
    policy.fusion.encoder.register_forward_hook(lambda module, args, output: contexts.append(output))
    policy.locator.register_forward_hook(lambda module, args, output: given.append(args[1]))
    positions = torch.linspace(-0.3, 0.9, 48).reshape(8, 6)
    batch[OBJECT_POSITIONS] = positions
    first = policy(batch)["locate_loss"].item()
    torch.testing.assert_close(given[-1], contexts[-1][:, 1:policy.fusion.tokens_per_view])
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for _ in range(100):  # x and y come only through the attention: it finds its footing slowly on this batch
        policy(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert policy(batch)["locate_loss"].item() < 0.4 * first  # about 0.26 after 100 updates
    observation = {"agentview_image": np.asarray(data[0]["observation.images.agentview"]),
                   "wrist_image": np.asarray(data[0]["observation.images.wrist"]),
                   "state": np.asarray(data[0]["observation.state"], np.float32),
                   "task_description": data[0]["instruction"]}
    loaded = AtlasPolicy.from_pretrained(policy.save_pretrained(tmp_path / "policy"), norm_stats=stats)
    np.testing.assert_allclose(loaded.locate(observation), policy.locate(observation), atol=1e-6)
    np.testing.assert_allclose(loaded.predict_action(observation), policy.predict_action(observation), atol=1e-6)
    with pytest.raises(ValueError, match="locate_readout: spatial reads out the locate query, which needs "
                                         "model.locate_weight > 0"):
        tiny_policy_config(locate_readout="spatial")
    with pytest.raises(ValueError, match="locate_readout must be linear or spatial, got 'grid'"):
        tiny_policy_config(locate_weight=1.0, locate_readout="grid")
