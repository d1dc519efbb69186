"""How long a stop signal takes to become a complete checkpoint and a finished W&B run, measured through
`accelerate launch` with one process, where Accelerate >= 1.16 passes SIGTERM on and SIGKILLs the trainer
5 s later.

    python benchmarks/stop_to_checkpoint.py --recipe demo --repeats 3
    python benchmarks/stop_to_checkpoint.py --recipe train_config --repeats 1   # VGGT-1B, random weights, CPU

The trainer is held at a step boundary (`ATLAS_VLA_TEST_WAIT_AT_STEP`), SIGTERM goes to the launcher alone
(Kubernetes' stop), and the script records signal -> checkpoint folder in place, signal -> W&B run finished
(its exit record written), signal -> trainer gone (Accelerate SIGKILLs it at 5 s), and whether the run was
marked preempted. A signal that arrives during an update first
waits for it, so the worst case adds one update: its duration is the run's own `train/steps_per_second`.
`train_config` keeps the recipe's model and trainable state (VGGT-1B frozen over both cameras at 224 px,
fusion and head, AdamW) on the CPU: random VGGT weights and MiniLM instead of MPNet (no Hub here), fp32,
micro-batch 1, synthetic data.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers import ACCELERATE_CPU_1, offline_environment  # the tests' launch command and environment
from wandb_records import find_run_files, read_run  # the tests' reader of offline run files

from atlas_vla.data.synthetic import make_synthetic_libero
from atlas_vla.training.preemption import WAIT_AT_STEP_ENV

STOP_STEP = 2
TIMEOUT_S = 900
RECIPES = {
    "demo": ["--config", "configs/demo.yaml"],
    "train_config": ["--config", "configs/train_config.yaml", "--model.vggt_pretrained", "null",
                     "--model.language.model_name_or_path", "minilm", "--mixed_precision", "no",
                     "--train_batch_size", "1", "--training.dataloader_num_workers", "0"],
}


def stop_once(recipe: str, data: Path, out: Path) -> dict[str, float | bool]:
    command = [*ACCELERATE_CPU_1, *RECIPES[recipe], "--data.source", str(data), "--data.generate_synthetic", "false",
               "--data.val_fraction", "0", "--output_dir", str(out), "--max_train_steps", str(STOP_STEP + 2),
               "--checkpointing_steps", "1000", "--validation_steps", "1000", "--logging.log_every_steps", "1",
               "--report_to", "wandb"]
    process = subprocess.Popen(command, cwd=REPO, env=offline_environment(**{WAIT_AT_STEP_ENV: str(STOP_STEP)}),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    marker = out / ".wait-rank-0"
    deadline = time.monotonic() + TIMEOUT_S
    while not (marker.exists() and marker.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the trainer never reached step {STOP_STEP}: " + process.communicate()[0][-3000:])
        time.sleep(0.05)
    trainer = int(marker.read_text())
    checkpoint = out / "checkpoints" / f"checkpoint-{STOP_STEP}"
    sent = time.perf_counter()
    os.kill(process.pid, signal.SIGTERM)
    saved = finished = gone = None
    while gone is None:
        now = time.perf_counter() - sent
        if now > TIMEOUT_S:
            raise RuntimeError(f"the trainer (pid {trainer}) did not end within {TIMEOUT_S} s of the signal")
        if saved is None and checkpoint.is_dir():
            saved = now
        if finished is None and any(read_run(f).exit_code is not None for f in find_run_files(out)):
            finished = now
        try:
            os.kill(trainer, 0)
        except ProcessLookupError:
            gone = now
        time.sleep(0.01)
    process.communicate(timeout=120)
    [run_file] = find_run_files(out)
    run = read_run(run_file)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rate = [r["train/steps_per_second"] for r in rows if "train/steps_per_second" in r][-1]
    return {"signal_to_checkpoint_s": saved if saved is not None else float("nan"),
            "signal_to_wandb_finished_s": finished if finished is not None else float("nan"), "signal_to_exit_s": gone,
            "update_s": 1.0 / rate, "wandb_finished_preempted": run.preempting and run.exit_code == 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="demo")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        image_size = 224 if args.recipe == "train_config" else 64
        data = make_synthetic_libero(Path(tmp) / "data", num_episodes=4, image_size=image_size)
        results = [stop_once(args.recipe, data, Path(tmp) / f"run-{i}") for i in range(args.repeats)]
    for result in results:
        print(json.dumps(result))
    summary = {key: statistics.median(r[key] for r in results) for key in results[0] if key.endswith("_s")}
    summary["wandb_finished_preempted"] = all(r["wandb_finished_preempted"] for r in results)
    print(f"{args.recipe}, median of {args.repeats}: " + json.dumps({k: round(v, 2) if isinstance(v, float) else v
                                                                     for k, v in summary.items()}))


if __name__ == "__main__":
    main()
