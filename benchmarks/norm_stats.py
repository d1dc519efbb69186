"""Normalisation statistics speed: `compute_norm_stats` over N frames of a table that has image columns.

    python benchmarks/norm_stats.py --frames 50000      # target: under 10 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import io
import time

import datasets
import numpy as np
from PIL import Image

from atlas_vla.constants import ACTION, AGENT_IMAGE, EPISODE_INDEX, FRAME_INDEX, INSTRUCTION, STATE, WRIST_IMAGE
from atlas_vla.data.normalization import compute_norm_stats


def make_table(frames: int, episode_length: int = 150) -> datasets.Dataset:
    """Canonical columns with real PNG image structs (one small frame repeated, so building is fast)."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    image = {"bytes": buffer.getvalue(), "path": None}
    features = datasets.Features({
        AGENT_IMAGE: datasets.Image(), WRIST_IMAGE: datasets.Image(),
        STATE: datasets.Sequence(datasets.Value("float32"), length=8),
        ACTION: datasets.Sequence(datasets.Value("float32"), length=7),
        INSTRUCTION: datasets.Value("string"), EPISODE_INDEX: datasets.Value("int64"), FRAME_INDEX: datasets.Value("int64"),
    })
    return datasets.Dataset.from_dict({
        AGENT_IMAGE: [image] * frames, WRIST_IMAGE: [image] * frames,
        STATE: rng.normal(size=(frames, 8)).astype(np.float32), ACTION: rng.normal(size=(frames, 7)).astype(np.float32),
        INSTRUCTION: ["pick up the bowl"] * frames, EPISODE_INDEX: np.arange(frames) // episode_length,
        FRAME_INDEX: np.arange(frames) % episode_length,
    }, features=features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    table = make_table(args.frames)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        stats = compute_norm_stats(table)
        times.append(time.perf_counter() - start)
    print(f"frames {stats.num_frames}  best {min(times):.3f} s  median {sorted(times)[len(times) // 2]:.3f} s  "
          f"(target < 10 s)  fingerprint {stats.fingerprint}")


if __name__ == "__main__":
    main()
