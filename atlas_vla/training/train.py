"""The training loop: `train(config)` builds, prepares, resumes, loops and exports, in numbered stages.

One optimizer update is one `global_step`; it is the step of every logged value, of checkpoint
names and of the LR schedule, on any number of processes and with any gradient accumulation.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from atlas_vla.config import TrainConfig, config_from_args, flatten, save_config, to_dict, usage
from atlas_vla.constants import ACTIONS, EPISODE_INDEX, INSTRUCTION, OBS_IMAGES
from atlas_vla.data.feature_cache import FeatureCache
from atlas_vla.data.libero import build_samples, collate, load_train_val
from atlas_vla.data.normalization import NormStats, compute_norm_stats
from atlas_vla.data.synthetic import make_synthetic_libero
from atlas_vla.video import write_mp4
from atlas_vla.eval.libero_sim import require_simulator
from atlas_vla.eval.offline import VAL_METRICS, baseline_metrics, metric_sums
from atlas_vla.models.policy import AtlasPolicy
from atlas_vla.training.checkpointing import TrainingState, check_fresh_output_dir, resolve_resume, save_checkpoint
from atlas_vla.training.tracking import (
    RUN_ID_FILE,
    annotate_episode,
    check_tracker_installed,
    log_media,
    log_videos,
    metrics_table,
    new_run_id,
    sweep_trial_dir,
    sweep_trial_run_id,
    wandb_init_kwargs,
)

logger = logging.getLogger("atlas_vla.train")
TRAIN_METRICS = ("loss", "pose_loss", "gripper_loss")
SUMMARY_NAME = "train_summary.json"
METRICS_NAME = "metrics.jsonl"  # every logged scalar, one JSON object per logging step
FINAL_DIR = "final"


def _setup_logging(accelerator: Accelerator, log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file and accelerator.is_main_process:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    level = logging.INFO if accelerator.is_local_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=level, handlers=handlers, force=True)


def _loader(samples: Any, config: TrainConfig, shuffle: bool) -> torch.utils.data.DataLoader:
    workers = config.training.dataloader_num_workers
    iterable = isinstance(samples, torch.utils.data.IterableDataset)
    return torch.utils.data.DataLoader(
        samples, batch_size=config.training.train_batch_size, shuffle=shuffle and not iterable,
        drop_last=shuffle, num_workers=workers, collate_fn=collate, persistent_workers=workers > 0,
        # its own generator: creating an epoch's iterator must not consume the global RNG,
        # or a resumed run would draw different random numbers than an uninterrupted one
        generator=torch.Generator().manual_seed(config.training.seed),
    )


def _has_rows(dataset: Any) -> bool:
    """False for an empty split (e.g. val_fraction 0); a stream always counts as having rows."""
    try:
        return len(dataset) > 0
    except TypeError:
        return True


def _norm_stats(config: TrainConfig, train_set: Any) -> NormStats:
    if config.data.norm_stats:
        return NormStats.load(config.data.norm_stats)
    if not hasattr(train_set, "select_columns") or not hasattr(train_set, "__len__"):
        raise ValueError("data.streaming is on: compute statistics once with `atlas-vla compute-stats SOURCE "
                         "--output stats.json` and set data.norm_stats to that file")
    return compute_norm_stats(train_set)


def validate(accelerator: Accelerator, policy: torch.nn.Module, loader: Iterable, limit: int | None) -> dict[str, float]:
    """Mean `val/*` metrics over up to `limit` batches per process, averaged across processes."""
    totals, count = metric_sums(policy, loader, limit)
    if not count:
        return {}
    means = accelerator.reduce((totals / count).to(accelerator.device), reduction="mean")
    return {f"val/{key}": float(value) for key, value in zip(VAL_METRICS, means)}


def _episode_video(policy: AtlasPolicy, samples: Any, path: Path, max_frames: int = 120) -> Path | None:
    """An mp4 of the first validation episode's agent view with predicted vs. true actions drawn."""
    frames, true, predicted = [], [], []
    first = None
    for index in range(min(len(samples), max_frames)):
        sample = samples[index]
        if first is None:
            first = sample[EPISODE_INDEX]
        if sample[EPISODE_INDEX] != first:
            break
        batch = collate([sample])
        predicted.append(policy.predict_action_chunk(batch)[0, 0])
        true.append(batch[ACTIONS][0, 0])
        frames.append(batch[OBS_IMAGES][0, 0])
    if not frames:
        return None
    return write_mp4(path, annotate_episode(torch.stack(frames), torch.stack(predicted), torch.stack(true)))


def evaluate_in_simulator(policy: AtlasPolicy, config: TrainConfig, references: dict, step: int) -> dict[str, Any]:
    """Closed-loop LIBERO success rates of the current policy (main process): `eval/*` scalars + videos."""
    from atlas_vla.eval import libero_sim as sim

    sim.require_simulator()
    cfg = config.eval
    folder = Path(config.training.output_dir) / "eval" / f"step-{step}"
    checkpoint = policy.save_pretrained(folder / "policy", references=references)
    from libero.libero import benchmark

    tasks = cfg.tasks if cfg.tasks is not None else list(range(benchmark.get_benchmark_dict()[cfg.suite]().n_tasks))
    max_steps = cfg.max_steps or sim.SUITE_MAX_STEPS[cfg.suite]
    specs = [sim.EpisodeSpec(cfg.suite, task, state, max_steps, cfg.replan_steps, cfg.camera_size, 0,
                             str(folder / "videos") if cfg.videos else None, cfg.temporal_ensemble)
             for task in tasks for state in cfg.initial_states]
    summary = sim.summarize(sim.evaluate(str(checkpoint), specs, num_workers=cfg.num_workers))
    sim.save_results(folder / "results.json", cfg.suite, summary, {"step": step})
    logs: dict[str, Any] = {"eval/success_rate": summary["success_rate"]}
    logs.update({f"eval/{cfg.suite}/task_{task}": row["success_rate"] for task, row in summary["tasks"].items()})
    logger.info("step %d %s", step, metrics_table(logs))
    logs["videos"] = [e["video"] for e in summary["episodes_detail"] if e["video"]]
    return logs


def _rank_checksums(accelerator: Accelerator, policy: torch.nn.Module) -> list[float]:
    """One checksum of the trainable weights per rank (they must all agree under DDP)."""
    total = sum(p.detach().double().sum() for p in policy.parameters())
    return [float(v) for v in accelerator.gather(total.reshape(1).to(accelerator.device).float())]


def train(config: TrainConfig, *, wandb_run_id: str | None = None) -> Path:
    """Run one training job; returns the folder of the exported policy.

    `wandb_run_id` attaches to an existing W&B run (e.g. the run a sweep agent created). A trial
    started by a W&B sweep agent (`sweep_trial_run_id`) writes into `<output_dir>/sweep-<run id>`,
    because all trials of a sweep share one command line and hence one `--output_dir`.
    """
    trial_id = sweep_trial_run_id()
    if trial_id is not None:
        folder = str(sweep_trial_dir(config.training.output_dir, trial_id))
        config = replace(config, training=replace(config.training, output_dir=folder))
        wandb_run_id = wandb_run_id or trial_id
    cfg_t = config.training
    output_dir = Path(cfg_t.output_dir)
    trackers = config.trackers
    check_tracker_installed(trackers)
    if config.eval.libero_steps:
        require_simulator()  # a missing [sim] extra fails now, not at the first evaluation hours later

    # 1. accelerator ------------------------------------------------------------------------------
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg_t.gradient_accumulation_steps,
        mixed_precision=cfg_t.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # rank 0 may spend long in validation or media logging: keep the other ranks from timing out
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))],
    )
    _setup_logging(accelerator, config.logging.log_file)
    if cfg_t.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg_t.seed)
    try:
        return _run(accelerator, config, wandb_run_id)
    finally:
        accelerator.end_training()  # also after an error: trackers are closed, W&B files flushed


def _run(accelerator: Accelerator, config: TrainConfig, wandb_run_id: str | None) -> Path:
    """Stages 2-7 of `train`, on a built accelerator."""
    cfg_t = config.training
    output_dir = Path(cfg_t.output_dir)
    trackers = config.trackers
    resume_dir = resolve_resume(output_dir, config.checkpoint.resume_from_checkpoint)
    if config.checkpoint.resume_from_checkpoint is None:
        check_fresh_output_dir(output_dir)  # retention would delete the new run's checkpoints, not the old

    # 2. data ---------------------------------------------------------------------------------------
    spec = config.model.sample_spec
    with accelerator.main_process_first():
        if config.data.generate_synthetic and not Path(config.data.source).exists():
            make_synthetic_libero(config.data.source)
        train_set, val_set = load_train_val(config.data)
        stats = _norm_stats(config, train_set)
    train_samples = build_samples(train_set, spec, config.data, train=True)
    val_samples = build_samples(val_set, spec, config.data) if _has_rows(val_set) else None
    val_loader = _loader(val_samples, config, shuffle=False) if val_samples is not None else None

    # 3. policy, optimizer, schedule ------------------------------------------------------------------
    policy = AtlasPolicy(config.model, stats)
    references = policy.backbone_references()  # hash the frozen encoders once
    if cfg_t.init_from and resume_dir is None:
        policy.load_trainable_weights(cfg_t.init_from)
        logger.info("initialised the trainable weights from %s", cfg_t.init_from)
    counts = policy.num_parameters()
    if cfg_t.cache_frozen_features:  # the frozen backbone runs once per sample here, never in the loop
        policy.to(accelerator.device)
        train_samples = FeatureCache.build(train_samples, policy.vision_features, batch_size=cfg_t.train_batch_size,
                                           copies=cfg_t.cached_copies, progress=accelerator.is_local_main_process)
        logger.info("cached the frozen VGGT features of %d training samples x %d copies (%.2f GB)", len(train_samples),
                    cfg_t.cached_copies, train_samples.nbytes / 1e9)
    train_loader = _loader(train_samples, config, shuffle=True)
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=cfg_t.learning_rate,
        betas=(cfg_t.adam_beta1, cfg_t.adam_beta2), eps=cfg_t.adam_epsilon, weight_decay=cfg_t.weight_decay,
    )
    policy, optimizer, train_loader = accelerator.prepare(policy, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    if accelerator.device.type == "cuda" and cfg_t.mixed_precision == "bf16":
        accelerator.unwrap_model(policy).cast_frozen(torch.bfloat16)
    try:
        batches_per_epoch = len(train_loader)
    except TypeError:
        batches_per_epoch = None  # streaming
    if cfg_t.max_train_steps is None and batches_per_epoch is None:
        raise ValueError("data.streaming is on: set training.max_train_steps (a stream has no epoch length)")
    updates_per_epoch = math.ceil(batches_per_epoch / cfg_t.gradient_accumulation_steps) if batches_per_epoch else None
    max_steps = cfg_t.max_train_steps or cfg_t.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch) if updates_per_epoch else sys.maxsize
    # a prepared scheduler steps once per process per update: size it in process-steps
    scheduler = get_scheduler(cfg_t.lr_scheduler, optimizer,
                              num_warmup_steps=cfg_t.lr_warmup_steps * accelerator.num_processes,
                              num_training_steps=max_steps * accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)

    def export_hook(models: list, weights: list, folder: str) -> None:
        if accelerator.is_main_process:
            accelerator.unwrap_model(models[0]).save_pretrained(Path(folder) / "policy", references=references)

    accelerator.register_save_state_pre_hook(export_hook)

    # 4. resume ---------------------------------------------------------------------------------------
    state = TrainingState(global_step=0, epoch=0, batches_in_epoch=0)
    if resume_dir is not None:
        try:
            accelerator.load_state(str(resume_dir))
        except Exception as error:
            raise ValueError(f"cannot resume from {resume_dir}: {error}") from error
        state = TrainingState.load(resume_dir)
        logger.info("resumed from %s at step %d", resume_dir, state.global_step)
    elif config.checkpoint.resume_from_checkpoint == "latest":
        logger.info("no checkpoint in %s yet: starting a new run", output_dir)
    run_id = state.wandb_run_id or wandb_run_id or new_run_id()
    state.wandb_run_id = run_id

    # 5. trackers --------------------------------------------------------------------------------------
    global_batch = cfg_t.train_batch_size * accelerator.num_processes * cfg_t.gradient_accumulation_steps
    setup = {"num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
             "mixed_precision": cfg_t.mixed_precision, "gradient_accumulation_steps": cfg_t.gradient_accumulation_steps,
             "micro_batch_size": cfg_t.train_batch_size, "global_batch_size": global_batch, "max_train_steps": max_steps}
    tracked = {**to_dict(config), "setup": setup, "parameters": counts, "norm_stats_fingerprint": stats.fingerprint}
    metrics_file = output_dir / METRICS_NAME
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
        stats.save(output_dir / "norm_stats.json")
        if resume_dir is None:  # a new run starts its local metric log anew; a resumed one appends to it
            metrics_file.write_text("")
    if trackers:
        init_kwargs = {"wandb": wandb_init_kwargs(config.wandb, output_dir, run_id)} if "wandb" in trackers else {}
        accelerator.init_trackers(config.wandb.project, config=flatten(tracked), init_kwargs=init_kwargs)
        if "wandb" in trackers and accelerator.is_main_process:
            # inside a sweep wandb ignores the id we pass and uses the agent's: store the id of the run
            # that really exists (the main process alone writes the id file and the checkpoint state)
            run_id = state.wandb_run_id = accelerator.get_tracker("wandb", unwrap=True).id
    if accelerator.is_main_process:
        (output_dir / RUN_ID_FILE).write_text(run_id + "\n")
    logger.info("setup: %s; parameters: %s", setup, counts)

    def record(values: dict[str, Any], step: int) -> None:
        """Send scalars to the trackers and keep a local copy (`metrics.jsonl`) on the main process."""
        accelerator.log(values, step=step)
        if accelerator.is_main_process:
            with metrics_file.open("a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")

    # 6. loop ------------------------------------------------------------------------------------------
    baseline = (baseline_metrics(val_loader, stats, cfg_t.num_validation_batches)
                if val_loader is not None else {})
    progress = tqdm(total=max_steps, initial=state.global_step, desc="train",
                    disable=not accelerator.is_local_main_process)
    validations = 0
    sums: dict[str, torch.Tensor] = {}
    micro_batches = 0
    first_step, steps_per_second = state.global_step, 0.0
    start = time.perf_counter()
    policy.train()
    while state.global_step < max_steps and state.epoch < num_epochs:
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(state.epoch)
        loader = (accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
                  if state.batches_in_epoch else train_loader)
        for batch in loader:
            with accelerator.accumulate(policy):
                out = policy(batch)
                accelerator.backward(out["loss"])
                if accelerator.sync_gradients and cfg_t.max_grad_norm:
                    accelerator.clip_grad_norm_(policy.parameters(), cfg_t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            for key in TRAIN_METRICS:  # undivided micro-batch losses; averaged below
                sums[key] = sums.get(key, 0) + out[key].detach().float()
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            progress.update(1)
            step = state.global_step
            if step % config.logging.log_every_steps == 0 or step == max_steps:
                means = accelerator.reduce(torch.stack([sums[k] / micro_batches for k in TRAIN_METRICS]), "mean")
                logs = {f"train/{k}": float(v) for k, v in zip(TRAIN_METRICS, means)}
                steps_per_second = (step - first_step) / max(time.perf_counter() - start, 1e-9)
                logs.update({"train/lr": scheduler.get_last_lr()[0], "train/step": step,
                             "train/epoch": state.epoch + state.batches_in_epoch / (batches_per_epoch or math.inf),
                             "train/steps_per_second": steps_per_second})
                record(logs, step)  # custom metrics: add them to `logs` here
                progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
                sums, micro_batches = {}, 0
            if val_loader is not None and (step % cfg_t.validation_steps == 0 or step == max_steps):
                val_logs = validate(accelerator, policy, val_loader, cfg_t.num_validation_batches)
                val_logs.update({f"val/baseline_{k}": v for k, v in baseline.items()})
                record(val_logs, step)
                logger.info("step %d %s", step, metrics_table(val_logs))
                validations += 1
                indexable = not isinstance(val_samples, torch.utils.data.IterableDataset)
                if config.logging.log_media and indexable and accelerator.is_main_process and "wandb" in trackers:
                    unwrapped = accelerator.unwrap_model(policy)
                    media = collate([val_samples[i] for i in range(min(config.logging.num_media_samples,
                                                                          len(val_samples)))])
                    every = config.logging.video_every_validations
                    video = (_episode_video(unwrapped, val_samples, output_dir / "media" / f"val_episode_{step}.mp4")
                             if every and validations % every == 1 % every else None)
                    log_media(accelerator, step, media[OBS_IMAGES][:, 0], list(media[INSTRUCTION]),
                              unwrapped.predict_action_chunk(media), media[ACTIONS], video)
            if config.eval.libero_steps and step % config.eval.libero_steps == 0:
                if accelerator.is_main_process:
                    try:
                        logs = evaluate_in_simulator(accelerator.unwrap_model(policy), config, references, step)
                        record({k: v for k, v in logs.items() if k != "videos"}, step)
                        log_videos(accelerator, step, logs["videos"])
                    except Exception as error:  # a broken evaluation (e.g. every worker died) must not end training
                        logger.error("step %d: the LIBERO simulator evaluation failed and is skipped, training "
                                     "continues: %s: %s", step, type(error).__name__, error)
                # the other ranks wait here (2 h process-group timeout); after a failed evaluation too
                accelerator.wait_for_everyone()
            if step % config.checkpoint.checkpointing_steps == 0 or step == max_steps:
                saved = TrainingState(step, state.epoch, state.batches_in_epoch, run_id)
                if state.batches_in_epoch == batches_per_epoch:  # this update ended the epoch
                    saved = TrainingState(step, state.epoch + 1, 0, run_id)
                save_checkpoint(accelerator, output_dir, saved, config.checkpoint.checkpoints_total_limit,
                                {"config.yaml": _yaml(config)})
            if step >= max_steps:
                break
        else:  # the epoch's data is exhausted
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()

    # 7. export ---------------------------------------------------------------------------------------
    checksums = _rank_checksums(accelerator, accelerator.unwrap_model(policy))
    final_dir = output_dir / FINAL_DIR
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(policy)
        unwrapped.save_pretrained(final_dir, references=references)
        summary = {"global_step": state.global_step, "num_processes": accelerator.num_processes,
                   "global_batch_size": global_batch, "rank_weight_checksums": checksums,
                   "wandb_run_id": run_id if "wandb" in trackers else None, "parameters": counts,
                   "seconds": time.perf_counter() - start, "train_steps_per_second": steps_per_second}
        (output_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
        if cfg_t.push_to_hub:
            unwrapped.push_to_hub(cfg_t.hub_model_id or output_dir.name)
        logger.info("exported the policy to %s", final_dir)
    accelerator.wait_for_everyone()
    return final_dir


def _yaml(config: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False)


def main(argv: Sequence[str] | None = None) -> int:
    """`train.py` / `atlas-vla-train` / `python -m atlas_vla.train`: parse, validate, train."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    try:
        config = config_from_args(argv)
        train(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    return 0
