"""PixelStem: a small trainable convolution over each camera image, one feature per fusion patch token.

The frozen backbone's patch tokens are what the fusion sees of an image. With a random (small, CPU) VGGT they keep
little of what tells a white plate from the light table, and no training reaches them, so no read-out can learn to
find the plate in them (`docs/closed-loop.md`, candidate G). The stem gives the policy a trainable view of the same
pixels: three stride-2 convolutions, average-pooled to the fusion's token grid (the cells). Their projection to the
fusion's width is added to each view's patch tokens (`Fusion.encode`); it starts at zero, so a policy with a fresh stem
acts exactly as it would without one. The spatial read-out also reads the cells themselves (`SpatialLocator`): a
short path from what a thing looks like to where the read-out looks.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

CHANNELS = (16, 32, 64)  # widths of the three stride-2 convolutions: 126 px -> 16 x 16 cells of 8 px


class PixelStem(nn.Module):
    """uint8 images (B, S, 3, H, W) -> (tokens (B, S, rows * columns, dim), cells (B, S, rows * columns, `channels`)) on
    `grid`, row by row: what joins the patch tokens, and the convolutions' pooled features it is projected from."""

    channels = CHANNELS[-1]

    def __init__(self, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for channels in CHANNELS:
            layers += [nn.Conv2d(width, channels, 3, stride=2, padding=1), nn.GELU()]
            width = channels
        self.convolutions = nn.Sequential(*layers)
        self.grid = grid
        self.project = nn.Linear(width, dim)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        B, S = images.shape[:2]
        pixels = images.flatten(0, 1).float() / 127.5 - 1.0  # (B*S, 3, H, W) in -1..1
        cells = F.adaptive_avg_pool2d(self.convolutions(pixels), self.grid)  # (B*S, C, rows, columns)
        cells = cells.flatten(2).transpose(1, 2).unflatten(0, (B, S))
        return self.project(cells), cells
