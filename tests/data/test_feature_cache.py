"""FeatureCache: the frozen backbone's outputs computed once give the same losses and predictions as
running it live, samples carry no images, and impossible combinations are refused up front."""

from __future__ import annotations

import pytest
import torch
from helpers import synthetic_dataset, tiny_policy_config

from atlas_vla.config import load_config
from atlas_vla.constants import OBS_IMAGES, OBS_VISION_FEATURES
from atlas_vla.data.config import DataConfig
from atlas_vla.data.feature_cache import FeatureCache
from atlas_vla.data.normalization import compute_norm_stats
from atlas_vla.data.samples import build_samples, collate
from atlas_vla.data.sources import load_libero
from atlas_vla.models.policy import AtlasPolicy


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    dataset = load_libero(str(synthetic_dataset(tmp_path_factory.mktemp("data"), num_episodes=2)))
    policy = AtlasPolicy(tiny_policy_config(), compute_norm_stats(dataset)).eval()
    return build_samples(dataset, policy.config.sample_spec), policy


def test_cached_features_match_the_live_backbone(setup):
    samples, policy = setup
    cache = FeatureCache.build(samples, policy.vision_features, batch_size=7, progress=False)
    assert len(cache) == len(samples)
    config = policy.config
    tokens = 1 + config.vggt.num_register_tokens + (config.image_size // 14) ** 2
    assert cache.features.shape == (len(samples), 1, 2, 2, tokens, 2 * config.vggt.embed_dim)
    assert cache.features.dtype == torch.float16 and cache.nbytes == cache.features.numel() * 2

    indices = [0, 8, len(samples) - 1]
    live, cached = collate(samples.__getitems__(indices)), collate(cache.__getitems__(indices))
    assert OBS_IMAGES not in cached and OBS_IMAGES in live
    expected = policy.vision_features(live[OBS_IMAGES])
    torch.testing.assert_close(cached[OBS_VISION_FEATURES].float(), expected, atol=2e-2, rtol=2e-3)  # fp16 storage
    for key in ("actions", "actions_is_pad", "observation.state", "episode_index", "frame_index"):
        torch.testing.assert_close(cached[key], live[key])
    assert cached["instruction"] == live["instruction"]
    with torch.no_grad():
        a, b = policy(live), policy(cached)
    assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-3)
    torch.testing.assert_close(policy.predict_action_chunk(live), policy.predict_action_chunk(cached), atol=1e-3,
                               rtol=1e-3)
    assert cache[-1][OBS_VISION_FEATURES].shape == cache.features.shape[2:]


def test_cache_refuses_streams_unfrozen_backbones_and_bad_sizes(setup):
    samples, policy = setup
    with pytest.raises(ValueError, match="needs map-style LiberoSamples with images"):
        FeatureCache.build(iter([]), policy.vision_features)
    with pytest.raises(ValueError, match=r"features of shape \(2, 1\) for \d+ samples"):
        FeatureCache(samples, torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"random_shift must be a non-negative integer \(pixels\), got -1"):
        DataConfig(random_shift=-1)
    with pytest.raises(ValueError, match="copies must be >= 1, got 0"):
        FeatureCache.build(samples, policy.vision_features, copies=0)
    with pytest.raises(ValueError, match=r"cached_copies: 4 .* data.random_shift > 0 \(got 0\)"):
        load_config(None, {"training": {"cache_frozen_features": True, "cached_copies": 4}})
    with pytest.raises(ValueError, match=r"cache_frozen_features: true needs data.streaming: false \(got True\)"):
        load_config(None, {"training": {"cache_frozen_features": True}, "data": {"streaming": True}})
    with pytest.raises(ValueError, match=r"model.freeze_vggt: true \(got False\)"):
        load_config(None, {"training": {"cache_frozen_features": True}, "model": {"freeze_vggt": False}})


def test_shifted_copies_are_cached_and_drawn_at_random(tmp_path):
    dataset = load_libero(str(synthetic_dataset(tmp_path, num_episodes=2)))
    policy = AtlasPolicy(tiny_policy_config(), compute_norm_stats(dataset)).eval()
    spec = policy.config.sample_spec
    samples = build_samples(dataset, spec, DataConfig(random_shift=4), train=True)
    exact = build_samples(dataset, spec, DataConfig(random_shift=4))  # validation / inference: never shifted
    assert samples.random_shift == 4 and exact.random_shift == 0
    torch.manual_seed(0)
    cache = FeatureCache.build(samples, policy.vision_features, batch_size=5, copies=3, progress=False)
    assert cache.features.shape[:2] == (len(samples), 3)
    copies = cache.features[0].float()
    assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[1], copies[2])
    live = policy.vision_features(collate(exact.__getitems__([0]))[OBS_IMAGES])[0]
    assert all(not torch.allclose(copy, live, atol=2e-2) for copy in copies)  # every copy was shifted
    drawn = {int(torch.argmin(torch.stack([(cache[0][OBS_VISION_FEATURES].float() - c).abs().sum() for c in copies])))
             for _ in range(40)}
    assert drawn == {0, 1, 2}
