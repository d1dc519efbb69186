"""What a policy W&B artifact costs: its size for a training config, and the time staging it adds to a checkpoint.

    python benchmarks/policy_artifact.py --config configs/sim_demos.yaml
    python benchmarks/policy_artifact.py --config configs/train_config.yaml --text-encoder-width 768

A policy version holds the trainable weights (`model.safetensors`), `config.json`, `norm_stats.json` and the
run's `config.yaml` (`training/artifacts.py`); the frozen VGGT and text encoder are referenced, not copied, so
they are built here without weights (on PyTorch's `meta` device) and only their widths matter. A text encoder
that cannot be loaded here (no network) is given by its width (`--text-encoder-width`, e.g. 768 for
sentence-transformers/all-mpnet-base-v2). Prints the files' sizes, the time `save_pretrained` takes (what every
checkpoint already pays) and the median time `ArtifactLog` takes to stage one version in an offline W&B run
(`WANDB_DATA_DIR` under a temporary folder), over `--repeats` versions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from atlas_vla.config import config_from_args, config_yaml
from atlas_vla.data.normalization import FeatureStats, NormStats
from atlas_vla.models.language import LanguageEncoder
from atlas_vla.models.policy import AtlasPolicy
from atlas_vla.models.vggt import VGGTAggregator
from atlas_vla.training.artifacts import ArtifactLog


class EncoderWidth(torch.nn.Module):
    """A text encoder reduced to what the trainable layers see of it: its width."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size


def build_policy(config_path: str, text_width: int | None) -> tuple[AtlasPolicy, str]:
    config = config_from_args(["--config", config_path, "--data.generate_synthetic", "false"])
    with torch.device("meta"):
        vggt = VGGTAggregator(config.model.vggt)
    language = EncoderWidth(text_width) if text_width else LanguageEncoder(config.model.language)
    rng = np.random.default_rng(0)  # statistics of made-up frames: the file's size is that of real ones
    stats = NormStats(FeatureStats.compute(rng.normal(size=(1000, 7))), FeatureStats.compute(rng.normal(size=(1000, 8))),
                      num_frames=1000, fingerprint="benchmark")
    return AtlasPolicy(config.model, stats, vggt=vggt, language=language), config_yaml(config)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sim_demos.yaml")
    parser.add_argument("--text-encoder-width", type=int, default=None,
                        help="the text encoder's hidden size, when it cannot be loaded here")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    policy, training_config = build_policy(args.config, args.text_encoder_width)
    references = {"vggt": {"weights_hash": "not-hashed"}, "language": {"weights_hash": "not-hashed"}}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ["WANDB_DATA_DIR"] = str(Path(tmp) / "wandb-data")
        import wandb
        from atlas_vla.config import WandbConfig

        run = wandb.init(project="atlas-vla-benchmark", dir=tmp)
        log = ArtifactLog(WandbConfig(log_model="all"), run.id, "val/pose_l1_error", {})
        saves, stagings = [], []
        for step in range(1, args.repeats + 1):
            checkpoint = Path(tmp) / f"checkpoint-{step}"
            started = time.perf_counter()
            policy.save_pretrained(checkpoint / "policy", references=references)
            (checkpoint / "config.yaml").write_text(training_config)
            saves.append(time.perf_counter() - started)
            started = time.perf_counter()
            assert log.after_checkpoint(run, checkpoint, step, final=False, is_best=False, metrics={}, evaluation=None)
            stagings.append(time.perf_counter() - started)
        sizes = {path.name: path.stat().st_size for path in sorted((checkpoint / "policy").iterdir())}
        sizes["config.yaml"] = (checkpoint / "config.yaml").stat().st_size
        run.finish()
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    print(f"{args.config}: {trainable:,} trainable parameters")
    for name, size in sizes.items():
        print(f"  {name:18s} {size / 1e6:8.3f} MB")
    print(f"  {'one version':18s} {sum(sizes.values()) / 1e6:8.3f} MB")
    print(f"save_pretrained: median {1000 * statistics.median(saves):.1f} ms; staging one version: median "
          f"{1000 * statistics.median(stagings):.1f} ms (min {1000 * min(stagings):.1f}, max {1000 * max(stagings):.1f}) "
          f"over {args.repeats}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
