"""Small builders shared by the tests: tiny CPU configs and data (importable as `helpers`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from atlas_vla.eval.libero_sim import SimulatorMissing, require_simulator
from atlas_vla.models.config import DinoConfig, FusionConfig, LanguageConfig, PolicyConfig, VGGTConfig


def _has_simulator() -> bool:
    try:
        require_simulator()
    except SimulatorMissing:
        return False
    return True


HAS_SIM = _has_simulator()  # the LIBERO simulator (the [sim] extra) is installed


def tiny_vggt_config() -> VGGTConfig:
    """The fixture-sized VGGT (embed 64, depth 2, 4 heads)."""
    return VGGTConfig(embed_dim=64, depth=2, num_heads=4, dino=DinoConfig(embed_dim=64, depth=2, num_heads=4))


def tiny_policy_config(**overrides) -> PolicyConfig:
    """A policy that builds and steps in well under a second on CPU: tiny random VGGT, real MiniLM."""
    values = dict(image_size=56, action_horizon=4, vggt=tiny_vggt_config(), vggt_pretrained=None, vggt_layers=[0, 1],
                  language=LanguageConfig("minilm"),
                  fusion=FusionConfig(hidden_dim=64, num_heads=4, encoder_depth=1, decoder_depth=1))
    values.update(overrides)
    return PolicyConfig(**values)


def synthetic_dataset(root: Path, num_episodes: int = 8) -> Path:
    """The synthetic demo dataset in `root` (written once per folder)."""
    from atlas_vla.data.synthetic import make_synthetic_libero

    path = root / f"synthetic-{num_episodes}"
    return path if path.exists() else make_synthetic_libero(path, num_episodes=num_episodes, image_size=64)


# `accelerate launch` of train.py as one CPU process, with no `accelerate config` needed
ACCELERATE_CPU_1 = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train.py"]
# the same with two CPU processes (torchrun under `accelerate launch`, gloo)
ACCELERATE_CPU_2 = ["env", "ACCELERATE_USE_CPU=1", sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                    "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "train.py"]


def tiny_args(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """train.py flags for a 6-update demo run on `data_dir`: validation at 3 and 6, checkpoints every 2, keep 2."""
    return ["--config", "configs/demo.yaml", "--data.source", str(data_dir), "--data.generate_synthetic", "false",
            "--data.val_fraction", "0.25", "--output_dir", str(output_dir), "--model.image_size", "56",
            "--train_batch_size", "8", "--max_train_steps", "6", "--validation_steps", "3",
            "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--lr_warmup_steps", "2",
            "--logging.log_every_steps", "1", *extra]


def offline_environment(**extra: str) -> dict[str, str]:
    """This process's environment for a training subprocess: W&B offline, no Hub, quiet tokenizers."""
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def lerobot_subset(source: Path, target: Path, episodes: list[int], alter=None) -> Path:
    """A copy of the LeRobot v2 folder `source` holding only `episodes` (their parquet files byte for byte, the
    metadata rewritten to match); `alter(table) -> table` may change an episode's columns (a broken source)."""
    import json
    import shutil

    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (source / "meta" / "episodes.jsonl").read_text().splitlines()]
    kept = [row for row in rows if row["episode_index"] in episodes]
    (target / "meta").mkdir(parents=True)
    (target / "data" / "chunk-000").mkdir(parents=True)
    (target / "meta" / "episodes.jsonl").write_text("".join(json.dumps(row) + "\n" for row in kept))
    shutil.copy(source / "meta" / "tasks.jsonl", target / "meta" / "tasks.jsonl")
    info = json.loads((source / "meta" / "info.json").read_text())
    info.update(total_episodes=len(kept), total_frames=sum(row["length"] for row in kept),
                splits={"train": f"0:{len(kept)}"})
    (target / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    for row in kept:
        name = f"episode_{row['episode_index']:06d}.parquet"
        if alter is None:
            shutil.copy(source / "data" / "chunk-000" / name, target / "data" / "chunk-000" / name)
        else:
            pq.write_table(alter(pq.read_table(source / "data" / "chunk-000" / name)),
                           target / "data" / "chunk-000" / name)
    return target
