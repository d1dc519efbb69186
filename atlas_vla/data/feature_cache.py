"""FeatureCache: training samples whose frozen VGGT features are computed once instead of every step.

The backbone is frozen and the sample transforms are deterministic, so a sample's VGGT outputs are
the same in every epoch. `FeatureCache.build` runs the frozen backbone once over every sample
(batched, no gradients), keeps the selected layers' tokens in one float16 tensor, and then serves
the samples with those tokens under `OBS_VISION_FEATURES` in place of their images; `AtlasPolicy`
accepts either. On a CPU this removes the backbone from the training step entirely.

With random-shift augmentation (`DataConfig.random_shift`) a single cached copy would freeze one
shift per sample forever; `copies=K` caches K independently shifted copies and each use draws one.

Memory: K x samples x layers x cameras x tokens x 2 * embed_dim x 2 bytes, e.g. 7,000 samples of a
128-wide VGGT at 126 px (2 layers, 2 cameras, 86 tokens) take 1.2 GB per copy. For VGGT-1B on a full LIBERO
suite that is hundreds of GB: there, run the backbone live on the GPU (the default).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from atlas_vla.constants import OBS_IMAGES, OBS_VISION_FEATURES
from atlas_vla.data.samples import LiberoSamples, collate


class FeatureCache(torch.utils.data.Dataset):
    """`LiberoSamples` with precomputed frozen features: sample i is `samples[i]` without its
    images, plus `OBS_VISION_FEATURES` = `features[i, k]` (L, S, P, 2C) for a random copy k of the
    K stored per sample (`features` is (N, K, L, S, P, 2C))."""

    def __init__(self, samples: LiberoSamples, features: Tensor) -> None:
        if len(features) != len(samples) or features.ndim < 2:
            raise ValueError(f"FeatureCache: features of shape {tuple(features.shape)} for {len(samples)} samples; "
                             "expected (samples, copies, ...)")
        self.samples = samples.without_images()
        self.features = features

    @classmethod
    def build(cls, samples: LiberoSamples, encode: Callable[[Tensor], Tensor], *, batch_size: int = 64,
              copies: int = 1, dtype: torch.dtype = torch.float16, progress: bool = True) -> "FeatureCache":
        """Run `encode` (uint8 images (B, S, 3, H, W) -> features (B, ...), e.g. `AtlasPolicy.vision_features`)
        `copies` times over every sample of `samples`, in order, and keep the results in `dtype` on the
        CPU. Each pass decodes the images again, so with `samples.random_shift` every copy is shifted anew."""
        if not isinstance(samples, LiberoSamples) or not samples.images:
            raise ValueError(f"FeatureCache.build needs map-style LiberoSamples with images, got {type(samples).__name__}"
                             " (a streaming dataset cannot be cached: set training.cache_frozen_features false)")
        if copies < 1:
            raise ValueError(f"FeatureCache.build: copies must be >= 1, got {copies}")
        features: Tensor | None = None
        batches = [(copy, start) for copy in range(copies) for start in range(0, len(samples), batch_size)]
        for copy, start in tqdm(batches, desc="caching frozen features", disable=not progress):
            indices = list(range(start, min(start + batch_size, len(samples))))
            batch = collate(samples.__getitems__(indices))
            with torch.no_grad():
                out = encode(batch[OBS_IMAGES]).to("cpu", dtype)
            if features is None:  # allocated once the per-sample shape is known
                features = torch.empty((len(samples), copies, *out.shape[1:]), dtype=dtype)
            features[start:start + len(indices), copy] = out
        if features is None:
            raise ValueError("FeatureCache.build: the training split has no samples")
        return cls(samples, features)

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        samples = self.samples.__getitems__(indices)
        copies = torch.randint(0, self.features.shape[1], (len(indices),)).tolist()  # per-worker torch RNG
        for sample, index, copy in zip(samples, indices, copies):
            sample[OBS_VISION_FEATURES] = self.features[index, copy]
        return samples
