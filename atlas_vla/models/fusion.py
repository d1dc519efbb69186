"""Fusion: VGGT tokens, instruction tokens and the robot state -> one feature per action-chunk step.

Each selected VGGT layer is projected to the fusion width and the projections are summed, so using
more layers costs parameters, not sequence length. Patch grids can be average-pooled to k x k per
frame; each frame's camera token is always kept. A transformer encoder mixes vision, language and
state tokens; learnable action queries (one per chunk step), and `extra_queries` more after them (the policy's
locate query), then attend to that context and to each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atlas_vla.models.config import FusionConfig


def _layer(config: FusionConfig, decoder: bool) -> nn.Module:
    cls = nn.TransformerDecoderLayer if decoder else nn.TransformerEncoderLayer
    return cls(config.hidden_dim, config.num_heads, int(config.hidden_dim * config.mlp_ratio), config.dropout,
               activation="gelu", batch_first=True, norm_first=True)


class Fusion(nn.Module):
    """(vision layers, language, state) -> query features (B, action_horizon + extra_queries, hidden_dim)."""

    def __init__(self, config: FusionConfig, *, vision_dim: int, num_vision_layers: int, num_views: int,
                 patch_grid: tuple[int, int], language_dim: int, state_dim: int, action_horizon: int,
                 extra_queries: int = 0) -> None:
        super().__init__()
        self.config = config
        D = config.hidden_dim
        self.patch_grid = patch_grid
        self.token_grid = (config.spatial_pool,) * 2 if config.spatial_pool else patch_grid  # each view's patches
        self.tokens_per_view = 1 + self.token_grid[0] * self.token_grid[1]  # camera token + (pooled) patches
        self.vision_proj = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, D)) for _ in range(num_vision_layers)
        )
        self.view_embed = nn.Parameter(torch.zeros(num_views, 1, D))
        self.token_embed = nn.Parameter(torch.zeros(1, self.tokens_per_view, D))
        self.language_proj = nn.Sequential(nn.LayerNorm(language_dim), nn.Linear(language_dim, D))
        self.state_proj = nn.Sequential(nn.Linear(state_dim, D), nn.GELU(), nn.Linear(D, D))
        self.type_embed = nn.Parameter(torch.zeros(3, D))  # vision, language, state
        self.encoder = nn.TransformerEncoder(_layer(config, decoder=False), config.encoder_depth,
                                             enable_nested_tensor=False)
        self.queries = nn.Parameter(torch.zeros(action_horizon + extra_queries, D))
        self.decoder = nn.TransformerDecoder(_layer(config, decoder=True), config.decoder_depth)
        self.norm = nn.LayerNorm(D)
        for param in (self.view_embed, self.token_embed, self.type_embed, self.queries):
            nn.init.normal_(param, std=0.02)

    def select_tokens(self, tokens: Tensor, patch_start_idx: int) -> Tensor:
        """One VGGT layer's tokens (B, S, P, 2C) -> the tokens the fusion reads (B, S, tokens_per_view, 2C):
        each frame's camera token, then its patch grid, average-pooled to spatial_pool x spatial_pool when
        set; register tokens are dropped. Parameter-free, so a feature store can apply it before storing."""
        B, S, _, C2 = tokens.shape
        camera = tokens[:, :, :1]
        patches = tokens[:, :, patch_start_idx:]
        if self.config.spatial_pool:
            h, w = self.patch_grid
            grid = patches.reshape(B * S, h, w, C2).permute(0, 3, 1, 2)
            grid = F.adaptive_avg_pool2d(grid, self.config.spatial_pool)
            patches = grid.flatten(2).transpose(1, 2).reshape(B, S, -1, C2)
        return torch.cat((camera, patches), dim=2)

    def _vision_tokens(self, layers: list[Tensor], pixels: Tensor | None) -> Tensor:
        fused = 0
        for proj, tokens in zip(self.vision_proj, layers):  # selected tokens (B, S, T, 2C) of each layer
            fused = fused + proj(tokens.float())  # (B, S, T, D)
        if pixels is not None:  # (B, S, T - 1, D): a feature per patch token, none for the camera token
            fused = fused + F.pad(pixels, (0, 0, 1, 0))
        fused = fused + self.view_embed + self.token_embed
        return fused.flatten(1, 2)  # (B, S*T, D)

    def encode(self, vision_layers: list[Tensor], language: Tensor, language_mask: Tensor,
               state: Tensor, pixels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The mixed context (B, N, D) of vision, language and state tokens and its padding mask (B, N; True =
        ignore). `vision_layers`: each selected layer's tokens as `select_tokens` returns them; `pixels`: optional
        features (B, S, rows * columns of `token_grid`, D) added to each view's patch tokens (`models.stem`)."""
        vision = self._vision_tokens(vision_layers, pixels) + self.type_embed[0]
        text = self.language_proj(language) + self.type_embed[1]  # (B, L, D)
        state_token = (self.state_proj(state) + self.type_embed[2]).unsqueeze(1)  # (B, 1, D)
        context = torch.cat((vision, text, state_token), dim=1)
        keep = torch.ones(vision.shape[:2], dtype=torch.bool, device=vision.device)
        padding = ~torch.cat((keep, language_mask, keep[:, :1]), dim=1)
        return self.encoder(context, src_key_padding_mask=padding), padding

    def view_patches(self, context: Tensor, view: int = 0) -> Tensor:
        """One view's patch tokens in `encode`'s context (B, rows * columns of `token_grid`, D), row by row; view 0
        is the current frame's agent view."""
        start = view * self.tokens_per_view + 1  # after the view's camera token
        return context[:, start:start + self.tokens_per_view - 1]

    def decode(self, context: Tensor, padding: Tensor, queries: Tensor | None = None) -> Tensor:
        """`queries` (Q, D; default all of them) attending to the context and to each other -> (B, Q, D)."""
        queries = (self.queries if queries is None else queries).expand(context.shape[0], -1, -1)
        return self.norm(self.decoder(queries, context, memory_key_padding_mask=padding))

    def forward(self, vision_layers: list[Tensor], language: Tensor, language_mask: Tensor, state: Tensor,
                pixels: Tensor | None = None) -> Tensor:
        """Every query's feature (B, action_horizon + extra_queries, D): `encode`, then `decode`."""
        return self.decode(*self.encode(vision_layers, language, language_mask, state, pixels))
