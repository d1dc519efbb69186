"""The locate query's read-outs: from the query's feature (and the fused context) to where the goal's object and its
target are, (B, 6) world xyz in metres, the object's first (`constants.OBJECT_POSITIONS`;
`PolicyConfig.locate_readout`).

- `LinearLocator` ("linear"): one linear map of the query's feature. Where something is must then pass through
  the query's attention into one vector, and on a coarse patch grid little of it does.
- `SpatialLocator` ("spatial"): the feature asks the current agent-view frame's patch tokens where the object and the
  target are; the attention-weighted mean of the patch centres (a spatial soft-argmax, as in deep spatial
  autoencoders) gives a position in the image finer than the grid, and a small MLP maps it to the world. The
  agent-view camera does not move, so that map is one function in every layout. A linear term of the feature is
  added to the heights only: what the image position alone does not say (the height of what the object rests on).
  A term on x and y too would let the feature place things without looking (measured: the bowl's x and y came from
  it, docs/closed-loop.md, candidate I). With a pixel stem (`models.stem`) each thing's attention logits also get a
  linear map of the stem's cells at each patch: what a plate or a bowl looks like, whichever plate or bowl the query
  then picks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

THINGS = 2  # the goal's object, then its target


class LinearLocator(nn.Linear):
    """Read-out "linear": the query's feature (B, D) -> (B, 6). The patches are not read."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 3 * THINGS)

    def forward(self, feature: Tensor, patches: Tensor | None = None, cells: Tensor | None = None) -> Tensor:
        return super().forward(feature)


class SpatialLocator(nn.Module):
    """Read-out "spatial": the query's feature (B, D), the agent view's patch tokens (B, rows * columns, D), row by
    row, and with `cell_dim` the pixel stem's cells of that view (B, rows * columns, cell_dim) -> (B, 6)."""

    def __init__(self, dim: int, grid: tuple[int, int], cell_dim: int | None = None) -> None:
        super().__init__()
        self.asks = nn.Linear(dim, THINGS * dim)  # one attention query per thing, from the locate query's feature
        self.keys = nn.Linear(dim, dim)
        self.looks = nn.Linear(cell_dim, THINGS) if cell_dim else None  # each thing's logit from the stem's cells
        rows, columns = grid
        y, x = torch.meshgrid(torch.linspace(-1, 1, rows), torch.linspace(-1, 1, columns), indexing="ij")
        self.register_buffer("centres", torch.stack((x, y), dim=-1).reshape(-1, 2), persistent=False)  # (P, 2)
        # (image x, image y, which thing) -> world xyz: the object and the target rest at different heights
        self.to_world = nn.Sequential(nn.Linear(2 + THINGS, dim), nn.GELU(), nn.Linear(dim, 3))
        self.heights = nn.Linear(dim, THINGS)  # added to each thing's z

    def attention(self, feature: Tensor, patches: Tensor, cells: Tensor | None = None) -> Tensor:
        """Each thing's attention over the patches (B, THINGS, P), summing to 1."""
        B, P, D = patches.shape
        if P != len(self.centres):
            raise ValueError(f"SpatialLocator expects {len(self.centres)} patch tokens, got {P}")
        if (cells is None) != (self.looks is None):
            raise ValueError("SpatialLocator: the pixel stem's cells are read exactly when it was built with cell_dim "
                             f"(cell_dim {'set' if self.looks is not None else 'unset'}, cells "
                             f"{'missing' if cells is None else 'given'})")
        asks = self.asks(feature).view(B, THINGS, D)
        logits = asks @ self.keys(patches).transpose(1, 2) / D ** 0.5
        if self.looks is not None:
            logits = logits + self.looks(cells).transpose(1, 2)
        return torch.softmax(logits, dim=-1)

    def image_positions(self, feature: Tensor, patches: Tensor, cells: Tensor | None = None) -> Tensor:
        """Where in the image (B, THINGS, 2; x then y, -1..1 from the first patch centre to the last) the feature's
        attention over the patches puts each thing."""
        weights = self.attention(feature, patches, cells)
        return weights @ self.centres.to(weights.dtype)

    def forward(self, feature: Tensor, patches: Tensor | None = None, cells: Tensor | None = None) -> Tensor:
        if patches is None:
            raise ValueError("SpatialLocator reads the agent view's patch tokens; none were given")
        where = self.image_positions(feature, patches, cells)
        which = torch.eye(THINGS, dtype=where.dtype, device=where.device).expand(where.shape[0], -1, -1)
        lift = F.pad(self.heights(feature).unsqueeze(-1), (2, 0))  # (B, THINGS, 3): zero x and y
        return (self.to_world(torch.cat((where, which), dim=-1)) + lift).flatten(1)
