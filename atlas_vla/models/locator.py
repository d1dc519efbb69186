"""The locate query's read-outs: from the query's feature (and the fused context) to where the goal's object and its
target are, (B, 6) world xyz in metres, the object's first (`constants.OBJECT_POSITIONS`;
`PolicyConfig.locate_readout`).

- `LinearLocator` ("linear"): one linear map of the query's feature. Where something is must then pass through
  the query's attention into one vector, and on a coarse patch grid little of it does.
- `SpatialLocator` ("spatial"): the feature asks the current agent-view frame's patch tokens where the object and the
  target are; the attention-weighted mean of the patch centres (a spatial soft-argmax, as in deep spatial
  autoencoders) gives a position in the image finer than the grid, and a small MLP maps it to the world. The
  agent-view camera does not move, so that map is one function in every layout. A linear term of the feature is
  added: what the image position alone does not say (the height of what the object rests on).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

THINGS = 2  # the goal's object, then its target


class LinearLocator(nn.Linear):
    """Read-out "linear": the query's feature (B, D) -> (B, 6). The patches are not read."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 3 * THINGS)

    def forward(self, feature: Tensor, patches: Tensor | None = None) -> Tensor:
        return super().forward(feature)


class SpatialLocator(nn.Module):
    """Read-out "spatial": the query's feature (B, D) and the agent view's patch tokens (B, rows * columns, D), row by
    row, -> (B, 6)."""

    def __init__(self, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.asks = nn.Linear(dim, THINGS * dim)  # one attention query per thing, from the locate query's feature
        self.keys = nn.Linear(dim, dim)
        rows, columns = grid
        y, x = torch.meshgrid(torch.linspace(-1, 1, rows), torch.linspace(-1, 1, columns), indexing="ij")
        self.register_buffer("centres", torch.stack((x, y), dim=-1).reshape(-1, 2), persistent=False)  # (P, 2)
        # (image x, image y, which thing) -> world xyz: the object and the target rest at different heights
        self.to_world = nn.Sequential(nn.Linear(2 + THINGS, dim), nn.GELU(), nn.Linear(dim, 3))
        self.offset = nn.Linear(dim, 3 * THINGS)

    def attention(self, feature: Tensor, patches: Tensor) -> Tensor:
        """Each thing's attention over the patches (B, THINGS, P), summing to 1."""
        B, P, D = patches.shape
        if P != len(self.centres):
            raise ValueError(f"SpatialLocator expects {len(self.centres)} patch tokens, got {P}")
        asks = self.asks(feature).view(B, THINGS, D)
        return torch.softmax(asks @ self.keys(patches).transpose(1, 2) / D ** 0.5, dim=-1)

    def image_positions(self, feature: Tensor, patches: Tensor) -> Tensor:
        """Where in the image (B, THINGS, 2; x then y, -1..1 from the first patch centre to the last) the feature's
        attention over the patches puts each thing."""
        weights = self.attention(feature, patches)
        return weights @ self.centres.to(weights.dtype)

    def forward(self, feature: Tensor, patches: Tensor | None = None) -> Tensor:
        if patches is None:
            raise ValueError("SpatialLocator reads the agent view's patch tokens; none were given")
        where = self.image_positions(feature, patches)
        which = torch.eye(THINGS, dtype=where.dtype, device=where.device).expand(where.shape[0], -1, -1)
        return self.to_world(torch.cat((where, which), dim=-1)).flatten(1) + self.offset(feature)
