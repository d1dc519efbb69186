"""Fusion: shapes with and without spatial pooling, and the instruction reaching the action queries."""

from __future__ import annotations

import torch

from atlas_vla.models.fusion import Fusion, FusionConfig


def build(pool=None) -> Fusion:
    torch.manual_seed(0)
    return Fusion(FusionConfig(hidden_dim=32, num_heads=4, encoder_depth=1, decoder_depth=1, spatial_pool=pool),
                  vision_dim=16, num_vision_layers=2, num_views=2, patch_grid=(4, 4), language_dim=8, state_dim=8,
                  action_horizon=5).eval()


def inputs(fusion: Fusion):
    # each layer's VGGT tokens (B, S, P, 2C) with patch_start_idx 5, as the fusion reads them
    layers = [fusion.select_tokens(torch.randn(3, 2, 5 + 16, 16), 5) for _ in range(2)]
    language = torch.randn(3, 6, 8)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 3:] = False
    return layers, language, mask, torch.randn(3, 8)


def test_shapes_and_pooling():
    fusion = build()
    layers, language, mask, state = inputs(fusion)
    assert layers[0].shape == (3, 2, 17, 16)  # camera token + 16 patches, registers dropped
    assert fusion(layers, language, mask, state).shape == (3, 5, 32)
    pooled = build(pool=2)
    assert pooled.tokens_per_view == 5
    tokens = torch.randn(3, 2, 5 + 16, 16)
    selected = pooled.select_tokens(tokens, 5)
    assert selected.shape == (3, 2, 5, 16)
    torch.testing.assert_close(selected[:, :, 0], tokens[:, :, 0])  # the camera token, kept as it is
    grid = tokens[:, :, 5:].reshape(3, 2, 4, 4, 16)
    torch.testing.assert_close(selected[:, :, 1], grid[:, :, :2, :2].mean(dim=(2, 3)))  # top-left 2 x 2 patches
    assert pooled([selected, selected], language, mask, state).shape == (3, 5, 32)


def test_instruction_and_padding_semantics():
    fusion = build()
    layers, language, mask, state = inputs(fusion)
    out = fusion(layers, language, mask, state)
    # another instruction (not a shifted one: the input LayerNorm removes a constant shift)
    changed = language.clone()
    changed[1] = language[2]
    difference = (fusion(layers, changed, mask, state)[1] - out[1]).abs().max().item()
    assert difference > 1e-2 * out[1].abs().max().item()  # language matters, far beyond float noise
    padded = language.clone()
    padded[0, 3:] = 100.0  # masked tokens must not matter
    torch.testing.assert_close(fusion(layers, padded, mask, state)[0], out[0])
