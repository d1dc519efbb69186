"""Samples per second through the training sample path, against the naive path.

Writes (once, then reuses) a LeRobot v2 dataset like `physical-intelligence/libero`: two 256x256
PNG cameras per frame, made from the real LIBERO frames of `../shared/fixtures/libero/sim_demos`
when they are there (a procedural scene otherwise), 8-D state, 7-D actions. Then it times, with
shuffled batches:

- naive: `dataset[i]` (datasets decodes both PNGs to PIL) + PIL resize per row, the action chunk
  sliced from the action column, on the main process;
- `LiberoSamples` + `collate` in a `DataLoader` with 0 and with 2 workers.

Both build the same samples (two cameras resized to 224, an 8-step action chunk with its mask).

    python benchmarks/dataloader.py --frames 2000 --batches 60
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from atlas_vla.constants import (
    ACTION,
    ACTIONS,
    ACTIONS_PAD_MASK,
    AGENT_IMAGE,
    EPISODE_INDEX,
    INSTRUCTION,
    OBS_IMAGES,
    OBS_STATE,
    STATE,
    WRIST_IMAGE,
)
from atlas_vla.data.samples import LiberoSamples, collate
from atlas_vla.data.sources import load_libero
from atlas_vla.data.spec import SampleSpec

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "libero" / "sim_demos"
EPISODE_LENGTH = 100


def _source_frames(count: int) -> list[tuple[Image.Image, Image.Image]]:
    """(agentview, wrist) 256x256 frames: real LIBERO frames if available, else a procedural scene."""
    files = sorted(FIXTURE.glob("data/chunk-000/episode_*.parquet"))
    frames = []
    if files:
        import pyarrow.parquet as pq

        for file in files:
            table = pq.read_table(file, columns=["image", "wrist_image"])
            for agent, wrist in zip(table.column("image").to_pylist(), table.column("wrist_image").to_pylist()):
                pair = (Image.open(io.BytesIO(x["bytes"])).convert("RGB") for x in (agent, wrist))
                frames.append(tuple(image.resize((256, 256), Image.Resampling.BILINEAR) for image in pair))
                if len(frames) == count:
                    return frames
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:256, 0:256]
    while len(frames) < count:
        base = np.stack([x, y, (x + y) // 2], -1) + rng.integers(0, 24, (256, 256, 3))
        frames.append((Image.fromarray(base.astype(np.uint8)), Image.fromarray(base[::-1].astype(np.uint8))))
    return frames


def write_dataset(root: Path, num_frames: int) -> Path:
    """A LeRobot v2 folder of `num_frames` PNG frames in episodes of EPISODE_LENGTH."""
    if (root / "meta" / "info.json").is_file():
        return root
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=root.name + ".tmp-"))
    lengths = [min(EPISODE_LENGTH, num_frames - start) for start in range(0, num_frames, EPISODE_LENGTH)]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "wrist_image": datasets.Image(),
            "state": datasets.List(datasets.Value("float32"), length=8),
            "actions": datasets.List(datasets.Value("float32"), length=7),
            "frame_index": datasets.Value("int64"),
            "episode_index": datasets.Value("int64"),
            "task_index": datasets.Value("int64"),
        }
    )
    frames = _source_frames(num_frames)
    rng = np.random.default_rng(0)
    (tmp / "data" / "chunk-000").mkdir(parents=True)
    start = 0
    for episode, length in enumerate(lengths):
        rows = {name: [] for name in features}
        for frame in range(length):
            for column, image in zip(("image", "wrist_image"), frames[start + frame]):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                rows[column].append({"bytes": buffer.getvalue(), "path": None})
            rows["state"].append(rng.normal(size=8).astype(np.float32))
            rows["actions"].append(rng.uniform(-1, 1, size=7).astype(np.float32))
            rows["frame_index"].append(frame)
            rows["episode_index"].append(episode)
            rows["task_index"].append(episode % 2)
        start += length
        path = tmp / "data" / "chunk-000" / f"episode_{episode:06d}.parquet"
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    (tmp / "meta").mkdir()
    info = {
        "codebase_version": "v2.0",
        "fps": 10,
        "total_episodes": len(lengths),
        "total_frames": num_frames,
        "chunks_size": 1000,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "features": {name: {"dtype": "image" if name.endswith("image") else "float32", "shape": [1]} for name in features},
    }
    (tmp / "meta" / "info.json").write_text(json.dumps(info))
    (tmp / "meta" / "tasks.jsonl").write_text('{"task_index": 0, "task": "task zero"}\n{"task_index": 1, "task": "task one"}\n')
    (tmp / "meta" / "episodes.jsonl").write_text("".join(json.dumps({"episode_index": e, "length": n}) + "\n" for e, n in enumerate(lengths)))
    os.replace(tmp, root)
    return root


def naive_batches(dataset: datasets.Dataset, spec: SampleSpec, order: np.ndarray, batch_size: int):
    """The first thing one writes: one `dataset[i]` per sample, PIL on the main process."""
    chunks = dataset.select_columns([ACTION, EPISODE_INDEX])
    size = (spec.image_size, spec.image_size)
    for begin in range(0, len(order), batch_size):
        samples = []
        for i in order[begin : begin + batch_size].tolist():
            row = dataset[int(i)]
            views = [
                np.asarray(row[camera].convert("RGB").resize(size, Image.Resampling.BILINEAR)).transpose(2, 0, 1)
                for camera in (AGENT_IMAGE, WRIST_IMAGE)
            ]
            ahead = chunks[i : i + spec.action_horizon]
            actions = [a for a, e in zip(ahead[ACTION], ahead[EPISODE_INDEX]) if e == row[EPISODE_INDEX]]
            pad = [False] * len(actions) + [True] * (spec.action_horizon - len(actions))
            actions += [actions[-1]] * (spec.action_horizon - len(actions))
            samples.append(
                {
                    OBS_IMAGES: torch.from_numpy(np.stack(views)),
                    OBS_STATE: torch.tensor(row[STATE], dtype=torch.float32),
                    INSTRUCTION: row[INSTRUCTION],
                    ACTIONS: torch.tensor(actions, dtype=torch.float32),
                    ACTIONS_PAD_MASK: torch.tensor(pad),
                }
            )
        yield collate(samples)


def _time(batches, num_batches: int, batch_size: int) -> float:
    """Samples/s over `num_batches`, after one warm-up batch (worker start-up is not counted)."""
    iterator = iter(batches)
    next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = next(iterator)
        assert batch[OBS_IMAGES].shape[0] == batch_size
    return num_batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000, help="frames in the generated dataset")
    parser.add_argument("--batches", type=int, default=60, help="timed batches per configuration")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--action_horizon", type=int, default=8)
    parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "atlas_vla_dataloader_bench"),
                        help="where the generated dataset lives (reused when present)")
    parser.add_argument("--regenerate", action="store_true", help="rewrite the generated dataset")
    args = parser.parse_args()

    root = Path(args.data_dir) / f"png-{args.frames}"
    if args.regenerate and root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    write_dataset(root, args.frames)
    print(f"dataset: {root} ({args.frames} frames, 2 PNG cameras 256x256) ready in {time.perf_counter() - started:.1f}s")

    dataset = load_libero(str(root))
    spec = SampleSpec(image_size=args.image_size, action_horizon=args.action_horizon)
    order = np.random.default_rng(0).permutation(len(dataset))
    needed = (args.batches + 1) * args.batch_size
    order = np.resize(order, needed)

    results = [("naive: dataset[i] + PIL, main process", _time(naive_batches(dataset, spec, order, args.batch_size), args.batches, args.batch_size))]
    samples = LiberoSamples(dataset, spec)
    for workers in (0, 2):
        sampler = torch.utils.data.RandomSampler(samples, replacement=True, num_samples=needed, generator=torch.Generator().manual_seed(0))
        loader = torch.utils.data.DataLoader(samples, batch_size=args.batch_size, sampler=sampler, num_workers=workers, collate_fn=collate)
        results.append((f"LiberoSamples, {workers} workers", _time(loader, args.batches, args.batch_size)))

    naive = results[0][1]
    print(f"\n{'path':<40} {'samples/s':>10} {'vs naive':>9}")
    for name, rate in results:
        print(f"{name:<40} {rate:>10.1f} {rate / naive:>8.2f}x")
    print(f"\n{os.cpu_count()} CPUs, batch {args.batch_size}, {args.batches} timed batches, images {args.image_size}, horizon {args.action_horizon}")


if __name__ == "__main__":
    main()
