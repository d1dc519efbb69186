"""What the training loop's bookkeeping costs: optimizer steps per second of `train.py` on the demo
model with W&B (offline) on, with tracking off, and of a bare PyTorch loop over the same model and data.

    python benchmarks/train_overhead.py --steps 200     # target: tracking + bookkeeping <= 5% over bare

The loop's rate is the one it logs at its last logging step (between checkpoints and validations).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from atlas_vla.config import load_config
from atlas_vla.data.normalization import compute_norm_stats
from atlas_vla.data.samples import build_samples, collate
from atlas_vla.data.split import load_train_val
from atlas_vla.data.synthetic import make_synthetic_libero
from atlas_vla.models.policy import AtlasPolicy

REPO = Path(__file__).resolve().parents[1]


def loop_rate(data: Path, output: Path, steps: int, report_to: str) -> float:
    env = {**os.environ, "WANDB_MODE": "offline"}
    subprocess.run([sys.executable, "train.py", "--config", "configs/demo.yaml", "--data.source", str(data),
                    "--output_dir", str(output), "--max_train_steps", str(steps), "--validation_steps", str(10 * steps),
                    "--checkpointing_steps", str(10 * steps), "--logging.log_every_steps", str(steps // 4),
                    "--report_to", report_to], cwd=REPO, env=env, check=True, capture_output=True)
    return json.loads((output / "train_summary.json").read_text())["train_steps_per_second"]


def bare_rate(data: Path, steps: int) -> float:
    config = load_config(REPO / "configs" / "demo.yaml", {"data": {"source": str(data)}})
    torch.manual_seed(0)
    train_set, _ = load_train_val(config.data)
    policy = AtlasPolicy(config.model, compute_norm_stats(train_set))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.training.learning_rate)
    loader = torch.utils.data.DataLoader(build_samples(train_set, config.model.sample_spec),
                                         batch_size=config.training.train_batch_size, shuffle=True, drop_last=True,
                                         collate_fn=collate)
    done, start = 0, None
    while done < steps:
        for batch in loader:
            if done == 1:
                start = time.perf_counter()  # skip the first (warm-up) step, as the loop's rate does not
            out = policy(batch)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == steps:
                break
    return (steps - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic_libero(Path(tmp) / "data")
        bare = bare_rate(data, args.steps)
        off = loop_rate(data, Path(tmp) / "off", args.steps, "none")
        on = loop_rate(data, Path(tmp) / "on", args.steps, "wandb")
    print(f"bare PyTorch loop      {bare:6.2f} steps/s")
    print(f"train.py, tracking off {off:6.2f} steps/s  ({100 * (bare / off - 1):+.1f}% time vs bare)")
    print(f"train.py, W&B offline  {on:6.2f} steps/s  ({100 * (bare / on - 1):+.1f}% time vs bare)")


if __name__ == "__main__":
    main()
