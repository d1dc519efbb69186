"""Policy training-step cost, split into the frozen backbone forward and the trainable part, and
prediction latency for one observation.

    python benchmarks/policy_step.py                      # tiny config on CPU (and VGGT-1B bf16 on a GPU)
    python benchmarks/policy_step.py --batch-size 32

On CPU the peak is the process's resident memory; on GPU the allocator's peak.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from atlas_vla.constants import ACTIONS, ACTIONS_PAD_MASK, INSTRUCTION, OBS_IMAGES, OBS_STATE
from atlas_vla.data.normalization import FeatureStats, NormStats
from atlas_vla.models.config import DinoConfig, FusionConfig, LanguageConfig, PolicyConfig, VGGTConfig
from atlas_vla.models.policy import AtlasPolicy


def fake_stats() -> NormStats:
    def stats(dim: int) -> FeatureStats:
        return FeatureStats(np.zeros(dim), np.ones(dim), -np.ones(dim), np.ones(dim), -np.ones(dim), np.ones(dim))

    return NormStats(stats(7), stats(8), 1, "benchmark")


def make_batch(config: PolicyConfig, batch: int, device: str) -> dict:
    spec = config.sample_spec
    return {
        OBS_IMAGES: torch.randint(0, 255, (batch, spec.num_views, 3, spec.image_size, spec.image_size),
                                  dtype=torch.uint8, device=device),
        OBS_STATE: torch.randn(batch, 8, device=device),
        INSTRUCTION: ["pick up the black bowl next to the ramekin and place it on the plate"] * batch,
        ACTIONS: torch.randn(batch, spec.action_horizon, 7, device=device),
        ACTIONS_PAD_MASK: torch.zeros(batch, spec.action_horizon, dtype=torch.bool, device=device),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def bench(name: str, config: PolicyConfig, batch: int, device: str, repeats: int) -> None:
    policy = AtlasPolicy(config, fake_stats()).to(device)
    if device == "cuda":
        policy.cast_frozen(torch.bfloat16)
        torch.cuda.reset_peak_memory_stats()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    data = make_batch(config, batch, device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step() -> None:
        with autocast:
            out = policy(data)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    def backbone() -> None:
        with autocast:
            policy.encode_observations(data)

    step_s = timed(step, device, repeats)
    backbone_s = timed(backbone, device, repeats)
    observation = {"agentview_image": np.zeros((256, 256, 3), np.uint8), "wrist_image": np.zeros((256, 256, 3), np.uint8),
                   "state": np.zeros(8), "task_description": data[INSTRUCTION][0]}
    predict_s = timed(lambda: policy.predict_action(observation), device, repeats)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    counts = policy.num_parameters()
    print(f"{name:26} batch {batch:>3}  step {step_s * 1e3:9.1f} ms  = backbone {backbone_s * 1e3:9.1f} ms "
          f"+ trainable {(step_s - backbone_s) * 1e3:8.1f} ms  predict {predict_s * 1e3:7.1f} ms  "
          f"peak {peak:5.2f} GiB  params {counts['total'] / 1e6:.1f}M ({counts['trainable'] / 1e6:.2f}M trainable)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tiny = PolicyConfig(image_size=84, action_horizon=4, vggt_pretrained=None, vggt_layers=[0, 1],
                        vggt=VGGTConfig(embed_dim=64, depth=2, num_heads=4, dino=DinoConfig(embed_dim=64, depth=2, num_heads=4)),
                        language=LanguageConfig("minilm"),
                        fusion=FusionConfig(hidden_dim=128, num_heads=4, encoder_depth=1, decoder_depth=2))
    bench("tiny (demo) cpu fp32", tiny, args.batch_size, "cpu", args.repeats)
    if torch.cuda.is_available():
        real = PolicyConfig(vggt_pretrained=None, language=LanguageConfig("minilm"),
                            fusion=FusionConfig(spatial_pool=8))  # VGGT-1B shape, random weights
        bench("VGGT-1B cuda bf16", real, 32, "cuda", args.repeats)


if __name__ == "__main__":
    main()
