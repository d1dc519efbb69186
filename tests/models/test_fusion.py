"""Fusion: shapes with and without spatial pooling, and the instruction reaching the action queries."""

from __future__ import annotations

import torch

from atlas_vla.models.fusion import Fusion, FusionConfig


def build(pool=None) -> Fusion:
    torch.manual_seed(0)
    return Fusion(FusionConfig(hidden_dim=32, num_heads=4, encoder_depth=1, decoder_depth=1, spatial_pool=pool),
                  vision_dim=16, num_vision_layers=2, num_views=2, patch_grid=(4, 4), language_dim=8, state_dim=8,
                  action_horizon=5).eval()


def inputs():
    layers = [torch.randn(3, 2, 5 + 16, 16) for _ in range(2)]  # (B, S, P, 2C), patch_start_idx 5
    language = torch.randn(3, 6, 8)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 3:] = False
    return layers, language, mask, torch.randn(3, 8)


def test_shapes_and_pooling():
    layers, language, mask, state = inputs()
    assert build()(layers, 5, language, mask, state).shape == (3, 5, 32)
    pooled = build(pool=2)
    assert pooled.tokens_per_view == 5
    assert pooled(layers, 5, language, mask, state).shape == (3, 5, 32)


def test_instruction_and_padding_semantics():
    fusion = build()
    layers, language, mask, state = inputs()
    out = fusion(layers, 5, language, mask, state)
    # another instruction (not a shifted one: the input LayerNorm removes a constant shift)
    changed = language.clone()
    changed[1] = language[2]
    difference = (fusion(layers, 5, changed, mask, state)[1] - out[1]).abs().max().item()
    assert difference > 1e-2 * out[1].abs().max().item()  # language matters, far beyond float noise
    padded = language.clone()
    padded[0, 3:] = 100.0  # masked tokens must not matter
    torch.testing.assert_close(fusion(layers, 5, padded, mask, state)[0], out[0])
