"""weights_hash: a short content hash of a module's weights, recorded in checkpoints and checked at load."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def weights_hash(module: nn.Module) -> str:
    """16 hex chars of SHA-256 over every state-dict entry's name, dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim safe
    return digest.hexdigest()[:16]
