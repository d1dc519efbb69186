"""VGGT aggregator: the frozen geometry backbone, weight-compatible with `facebook/VGGT-1B`.

VGGT (Visual Geometry Grounded Transformer) is in neither `transformers` nor PyPI, so atlas-vla
carries its own implementation of the Aggregator, the 909M-parameter trunk whose tokens Atlas reads.
It loads the official weights unchanged (state-dict keys are the official ones without the
`aggregator.` prefix) and reproduces the official outputs.

The file reads from parts to whole: rotary position embedding, attention, transformer block, the
DINOv2 patch embedding, then the aggregator that alternates frame and global attention.
"""

from __future__ import annotations

import math
import pickle
from contextlib import nullcontext
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atlas_vla.hub import local_path_or_hub_id
from atlas_vla.models.config import (
    DEFAULT_VGGT_REPO_ID,
    DinoConfig,
    PolicyConfig,
    VGGTConfig,
)
from atlas_vla.models.weights import weights_hash

_PREFIX = "aggregator."
_IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the aggregator normalises its [0, 1] input itself
_IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# parts
# ----------------------------------------------------------------------------------------------


class RotaryPositionEmbedding2D(nn.Module):
    """2D RoPE: the first half of each head is rotated by the row, the second half by the column."""

    def __init__(self, frequency: float = 100.0) -> None:
        super().__init__()
        self.frequency = frequency
        self.num_positions: int | None = None  # set once per forward by the aggregator (avoids a GPU sync)
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _cos_sin(self, num_positions: int, half: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (num_positions, half, device, dtype)
        if key not in self._tables:
            inv_freq = 1.0 / (self.frequency ** (torch.arange(0, half, 2, device=device).float() / half))
            angles = torch.outer(torch.arange(num_positions, device=device, dtype=inv_freq.dtype), inv_freq)
            angles = torch.cat((angles, angles), dim=-1).to(dtype)  # (num_positions, half)
            self._tables = {key: (angles.cos(), angles.sin())}  # one size at a time
        return self._tables[key]

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        # tokens (B, heads, N, D); positions (B, N, 2) integer (row, col)
        half = tokens.shape[-1] // 2
        num_positions = self.num_positions or int(positions.max()) + 1
        cos, sin = self._cos_sin(num_positions, half, tokens.device, tokens.dtype)
        rows, cols = tokens.chunk(2, dim=-1)
        return torch.cat(
            (self._rotate(rows, positions[..., 0], cos, sin), self._rotate(cols, positions[..., 1], cos, sin)), dim=-1
        )

    @staticmethod
    def _rotate(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        cos = F.embedding(positions, cos)[:, None]  # (B, 1, N, half)
        sin = F.embedding(positions, sin)[:, None]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Multi-head self-attention with optional per-head q/k LayerNorm and 2D RoPE (fused SDPA kernel)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool, qk_norm: bool,
                 rope: RotaryPositionEmbedding2D | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, heads, N, head_dim)
        if self.rope is not None and pos is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as the official blocks


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: `x + ls1(attn(norm1(x)))`, then `x + ls2(mlp(norm2(x)))`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, qkv_bias: bool, proj_bias: bool,
                 ffn_bias: bool, init_values: float, norm_eps: float, qk_norm: bool = False,
                 rope: RotaryPositionEmbedding2D | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, qk_norm, rope)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), ffn_bias)
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (N, patches, C)


class DinoPatchEmbed(nn.Module):
    """DINOv2 ViT with registers, used whole as VGGT's patch embedding; returns normalised patch tokens.

    Its weights were fine-tuned inside VGGT: they always come from the VGGT checkpoint, never from the
    public DINOv2 one. `mask_token` is unused but part of the official state dict.
    """

    def __init__(self, config: DinoConfig) -> None:
        super().__init__()
        self.config = config
        C = config.embed_dim
        grid = config.img_size // config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, C))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, C))
        self.mask_token = nn.Parameter(torch.zeros(1, C), requires_grad=False)
        self.patch_embed = PatchEmbed(config.patch_size, C)
        self.blocks = nn.ModuleList(
            Block(C, config.num_heads, config.mlp_ratio, qkv_bias=True, proj_bias=True, ffn_bias=True,
                  init_values=config.init_values, norm_eps=1e-6)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(C, eps=1e-6)

    def _position_embedding(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        """The trained grid's position embedding resized (bicubic, antialiased) to `height x width` patches."""
        pos_embed = self.pos_embed.float()
        side = int(math.sqrt(pos_embed.shape[1] - 1))
        if height == width == side:
            return self.pos_embed
        patch_pos = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        offset = self.config.interpolate_offset
        resize = (
            {"scale_factor": ((height + offset) / side, (width + offset) / side)} if offset else {"size": (height, width)}
        )
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.config.interpolate_antialias, **resize)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, height * width, -1)
        return torch.cat((pos_embed[:, :1], patch_pos), dim=1).to(dtype)

    def forward(self, images: Tensor) -> Tensor:
        # images (N, 3, H, W), already ImageNet-normalised
        N, _, H, W = images.shape
        p = self.config.patch_size
        x = self.patch_embed(images)  # (N, P, C)
        x = torch.cat((self.cls_token.expand(N, -1, -1), x), dim=1)
        x = x + self._position_embedding(H // p, W // p, x.dtype)
        x = torch.cat((x[:, :1], self.register_tokens.expand(N, -1, -1), x[:, 1:]), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1 + self.config.num_register_tokens:]  # patch tokens only


def _special_tokens(token: Tensor, batch: int, frames: int) -> Tensor:
    """Slot 0 of `token` (1, 2, n, C) for the first frame of each sequence, slot 1 for the others."""
    first = token[:, :1].expand(batch, 1, *token.shape[2:])
    others = token[:, 1:].expand(batch, frames - 1, *token.shape[2:])
    return torch.cat((first, others), dim=1).reshape(batch * frames, *token.shape[2:])


def _patch_positions(frames: int, height: int, width: int, special: int, device: torch.device) -> Tensor:
    """RoPE positions per token: special tokens at (0, 0), patches at their (row, col) + 1."""
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    grid = torch.stack((rows.flatten(), cols.flatten()), dim=-1) + 1
    pos = torch.cat((torch.zeros(special, 2, dtype=grid.dtype, device=device), grid), dim=0)
    return pos.expand(frames, -1, -1)  # (frames, P, 2)


# ----------------------------------------------------------------------------------------------
# the aggregator
# ----------------------------------------------------------------------------------------------


class VGGTAggregator(nn.Module):
    """VGGT's alternating-attention trunk: per-frame DINOv2 patches, then `depth` rounds of frame and
    global attention. Output `i` is `cat(frame_out_i, global_out_i)`, shape (B, S, P, 2 * embed_dim),
    where each frame's tokens are [camera, registers, patches] and `patch_start_idx` = 1 + registers.
    """

    def __init__(self, config: VGGTConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or VGGTConfig()
        C = config.embed_dim
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, C))
        self.register_token = nn.Parameter(torch.zeros(1, 2, config.num_register_tokens, C))
        self.patch_embed = DinoPatchEmbed(config.dino)
        rope = RotaryPositionEmbedding2D(config.rope_freq) if config.rope_freq > 0 else None

        def blocks() -> nn.ModuleList:
            return nn.ModuleList(
                Block(C, config.num_heads, config.mlp_ratio, qkv_bias=config.qkv_bias, proj_bias=config.proj_bias,
                      ffn_bias=config.ffn_bias, init_values=config.init_values, norm_eps=1e-5,
                      qk_norm=config.qk_norm, rope=rope)
                for _ in range(config.depth)
            )

        self.rope = rope
        self.frame_blocks = blocks()
        self.global_blocks = blocks()
        self._add_normalisation_buffers()
        self.loaded_from: str | None = None  # where from_pretrained read the weights (None: random init)

    def _add_normalisation_buffers(self) -> None:
        self.register_buffer("_resnet_mean", torch.tensor(_IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_resnet_std", torch.tensor(_IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)

    @property
    def patch_start_idx(self) -> int:
        return self.config.patch_start_idx

    def init_weights(self, seed: int = 0) -> "VGGTAggregator":
        """Deterministic random initialisation (ViT-style), for CPU demos and tests without the Hub."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("gamma"):
                    continue  # LayerScale keeps its configured init value
                if ".norm" in name or "_norm" in name or name.startswith("norm"):
                    param.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        self.loaded_from = None
        return self

    # --- forward -----------------------------------------------------------------------------

    def _check_images(self, images: Tensor) -> None:
        p = self.config.patch_size
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"VGGT expects images of shape (B, S, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"VGGT expects float images in [0, 1], got dtype {images.dtype}")
        height, width = images.shape[-2:]
        if height % p or width % p or not height or not width:
            raise ValueError(f"VGGT expects H and W to be multiples of {p}, got {height} x {width}")

    def _resolve_layers(self, layers: Sequence[int] | None) -> list[int]:
        depth = self.config.depth
        if layers is None:
            return list(range(depth))
        if not len(layers):
            raise ValueError("VGGT layers must name at least one depth output (or be None for all)")
        resolved = []
        for layer in layers:
            if not -depth <= layer < depth:
                raise ValueError(f"VGGT layer {layer} is out of range for depth {depth}")
            resolved.append(layer % depth)
        return resolved

    def forward(self, images: Tensor, layers: Sequence[int] | None = None) -> tuple[list[Tensor], int]:
        """Aggregate `images` (B, S, 3, H, W) in [0, 1].

        Returns the per-depth tokens (B, S, P, 2 * embed_dim) and `patch_start_idx`. `layers` keeps
        only those depth outputs, in the order given (negative indices count from the end), and the
        blocks after the deepest one are not run.
        """
        self._check_images(images)
        wanted = self._resolve_layers(layers)
        B, S, _, H, W = images.shape
        p = self.config.patch_size
        images = (images - self._resnet_mean) / self._resnet_std
        patches = self.patch_embed(images.reshape(B * S, 3, H, W))  # (B*S, P_patch, C)
        tokens = torch.cat(
            (_special_tokens(self.camera_token, B, S), _special_tokens(self.register_token, B, S), patches), dim=1
        )  # (B*S, P, C)
        P, C = tokens.shape[1:]
        pos = _patch_positions(B * S, H // p, W // p, self.patch_start_idx, images.device)  # (B*S, P, 2)
        if self.rope is not None:
            self.rope.num_positions = max(H, W) // p + 1  # positions are the grid + 1

        kept: dict[int, Tensor] = {}
        block_size = self.config.aa_block_size
        for group in range(max(wanted) // block_size + 1):
            intermediates: dict[str, list[Tensor]] = {}
            for kind in self.config.aa_order:
                outputs = []
                for i in range(group * block_size, (group + 1) * block_size):
                    if kind == "frame":
                        tokens = self.frame_blocks[i](tokens.reshape(B * S, P, C), pos=pos.reshape(B * S, P, 2))
                    else:
                        tokens = self.global_blocks[i](tokens.reshape(B, S * P, C), pos=pos.reshape(B, S * P, 2))
                    outputs.append(tokens.reshape(B, S, P, C))
                intermediates[kind] = outputs
            for offset in range(block_size):
                depth_index = group * block_size + offset
                if depth_index in wanted:
                    kept[depth_index] = torch.cat(
                        (intermediates["frame"][offset], intermediates["global"][offset]), dim=-1
                    )  # (B, S, P, 2C)
        return [kept[i] for i in wanted], self.patch_start_idx

    # --- frozen use ----------------------------------------------------------------------------

    def freeze(self) -> "VGGTAggregator":
        """Eval mode and no gradients anywhere: the backbone is a fixed feature extractor."""
        self.eval()
        self.requires_grad_(False)
        return self

    def encode(self, images: Tensor, layers: Sequence[int] | None = None,
               autocast_dtype: torch.dtype | None = None) -> tuple[list[Tensor], int]:
        """Frozen forward: no autograd graph, bf16 autocast on CUDA (override with `autocast_dtype`).

        The outputs are ordinary tensors (cloned out of inference mode), so trainable layers can take
        them as inputs and backpropagate into themselves.
        """
        if autocast_dtype is None and images.device.type == "cuda":
            autocast_dtype = torch.bfloat16
        autocast = torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with torch.inference_mode(), autocast:
            outputs, patch_start_idx = self(images, layers)
        return [out.clone() for out in outputs], patch_start_idx

    # --- weights -------------------------------------------------------------------------------

    def weights_hash(self) -> str:
        """Short content hash (16 hex chars) of the state dict: names, dtypes, shapes and bytes."""
        return weights_hash(self)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_VGGT_REPO_ID, revision: str | None = None,
                        config: VGGTConfig | None = None) -> "VGGTAggregator":
        """Load the aggregator from a Hub repo id, a local folder, a `.safetensors` file or a `.pt` state dict.

        Only the `aggregator.*` tensors are read (the prefix is optional); the heads of the full
        model are skipped. Loading is strict: missing, unexpected or mis-shaped keys raise a
        `ValueError` naming the first few. `config` defaults to VGGT-1B.
        """
        weights_file = _resolve_weights_file(name_or_path, revision)
        state = _read_aggregator_state(weights_file)
        with torch.device("meta"):
            model = cls(config)
        _check_state(model, state, weights_file)
        model.load_state_dict(state, strict=True, assign=True)
        model._add_normalisation_buffers()  # non-persistent buffers were created on the meta device
        model.patch_embed.mask_token.requires_grad_(False)
        model.loaded_from = name_or_path if revision is None else f"{name_or_path}@{revision}"
        return model


def build_vggt(config: PolicyConfig) -> VGGTAggregator:
    """A policy's VGGT: pretrained weights when `vggt_pretrained` is set, else a seeded random init."""
    if config.vggt_pretrained:
        return VGGTAggregator.from_pretrained(config.vggt_pretrained, revision=config.vggt_revision, config=config.vggt)
    return VGGTAggregator(config.vggt).init_weights(config.vggt_init_seed)


def _resolve_weights_file(name_or_path: str, revision: str | None) -> Path:
    """A local weights file for `name_or_path`: the file itself, a folder's model file, or a Hub download."""
    found = local_path_or_hub_id(name_or_path, f"VGGT weights not found: {Path(name_or_path).expanduser()}")
    if isinstance(found, Path) and found.is_file():
        return found
    if isinstance(found, Path):
        for candidate in ("model.safetensors", "model.pt"):
            if (found / candidate).is_file():
                return found / candidate
        raise FileNotFoundError(f"no model.safetensors or model.pt in {found}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(found, "model.safetensors", revision=revision))
    except LocalEntryNotFoundError:
        raise  # offline and not cached: trying model.pt cannot help
    except EntryNotFoundError:  # the repo has no safetensors file
        return Path(hf_hub_download(found, "model.pt", revision=revision))


def _read_aggregator_state(weights_file: Path) -> dict[str, Tensor]:
    """The aggregator tensors of a weights file, without the `aggregator.` prefix."""
    if weights_file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(weights_file))
        except Exception as error:  # safetensors' own SafetensorError for a bad header
            raise ValueError(f"{weights_file} is not a readable safetensors file (truncated or corrupt?): "
                             f"{error}") from None
    else:
        try:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch's message would suggest weights_only=False: never do that here
            raise ValueError(f"{weights_file} holds pickled Python objects besides tensors, which atlas-vla never "
                             f"unpickles; convert a copy you trust to safetensors (safetensors.torch.save_file "
                             f"of its state dict)") from None
        except Exception as error:  # not a torch file at all
            raise ValueError(f"cannot read {weights_file} as a torch state dict: {type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''}") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{weights_file} holds a {type(state).__name__}, expected a state dict")
    if any(k.startswith(_PREFIX) for k in state):
        return {k[len(_PREFIX):]: v for k, v in state.items() if k.startswith(_PREFIX)}
    return dict(state)


def _check_state(model: nn.Module, state: Mapping[str, Tensor], source: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    if wrong:
        problems.append(f"{len(wrong)} mis-shaped tensors, e.g. {wrong[:3]}")
    if problems:
        raise ValueError(f"{source} does not match the VGGT aggregator configuration: " + "; ".join(problems))
