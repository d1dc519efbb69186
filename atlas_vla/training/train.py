"""The training loop: `train(config)` sets up a run, fits it and exports the policy.

`setup_run` builds everything the loop needs in numbered stages (accelerator, data, policy +
optimizer + schedule, resume, trackers) and returns one `TrainingRun`; `fit` runs the optimizer
updates and, after each, whatever is due (logging, validation, simulator evaluation, checkpoint);
`export_policy` writes the final policy and the run summary.

One optimizer update is one `global_step`; it is the step of every logged value, of checkpoint
names and of the LR schedule, on any number of processes and with any gradient accumulation.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from tqdm.auto import tqdm
from transformers import get_scheduler

from atlas_vla.config import (
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    TrainConfig,
    TrainingConfig,
    config_from_args,
    config_yaml,
    load_yaml,
    save_config,
    usage,
)
from atlas_vla.constants import ACTIONS, EPISODE_INDEX, INSTRUCTION, OBS_IMAGES
from atlas_vla.data.config import DataConfig
from atlas_vla.data.feature_store import FeatureStore, StoredFeatureSamples, StoreKey, build_store, is_complete
from atlas_vla.data.mixture import SourceWeightedSampler
from atlas_vla.data.normalization import NormStats, compute_norm_stats
from atlas_vla.data.samples import build_samples, collate
from atlas_vla.data.spec import SampleSpec
from atlas_vla.data.split import load_train_val
from atlas_vla.data.synthetic import make_synthetic_libero
from atlas_vla.eval.libero_sim import require_simulator
from atlas_vla.eval.offline import VAL_METRICS, baseline_metrics, metric_sums
from atlas_vla.files import write_json_atomic, write_text_atomic
from atlas_vla.models.config import PolicyConfig
from atlas_vla.models.policy import AtlasPolicy
from atlas_vla.schema import flatten, print_renames_as_one_line, to_dict
from atlas_vla.training.checkpointing import (
    TrainingState,
    apply_retention,
    check_fresh_output_dir,
    check_output_dir,
    check_random_states_restored,
    checkpoints_dir,
    resolve_resume,
    save_checkpoint,
)
from atlas_vla.training.preemption import StopRequest, ignore_stop_signals, record_stop, wait_for_test
from atlas_vla.training.tracking import (
    RUN_ID_FILE,
    WandbService,
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
from atlas_vla.video import write_mp4

logger = logging.getLogger("atlas_vla.train")
TRAIN_METRICS = ("loss", "pose_loss", "gripper_loss")
SUMMARY_NAME = "train_summary.json"
METRICS_NAME = "metrics.jsonl"  # every logged scalar, one JSON object per logging step
FINAL_DIR = "final"


@dataclass
class TrainingRun:
    """Everything `fit` and `export_policy` need, built once by `setup_run`.

    `policy`, `optimizer`, `scheduler` and the loaders are the `accelerator.prepare`d objects;
    `state` is where training stands and is advanced by `fit` (a resumed run starts from its checkpoint's).
    """

    config: TrainConfig  # the resolved config (a sweep trial's output_dir already applied)
    accelerator: Accelerator
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    val_loader: Any | None  # None for an empty validation split
    val_samples: Any | None
    stats: NormStats
    references: dict[str, Any]  # ids and weight hashes of the frozen encoders, saved with every exported policy
    parameter_counts: dict[str, int]
    max_steps: int  # optimizer updates of the whole run
    batches_per_epoch: int | None  # micro-batches per process and epoch; None for a stream
    num_epochs: int  # epochs that `max_steps` spans (sys.maxsize for a stream)
    state: TrainingState = field(default_factory=lambda: TrainingState(global_step=0, epoch=0, batches_in_epoch=0))
    stopped_at: Path | None = None  # the checkpoint saved when a stop signal ended training early

    @property
    def output_dir(self) -> Path:
        return Path(self.config.training.output_dir)

    @property
    def trackers(self) -> list[str]:
        return self.config.trackers

    @property
    def run_id(self) -> str:
        """The W&B run id: kept in the training state so that a resumed run continues the same W&B run."""
        assert self.state.wandb_run_id is not None, "setup_run sets the run id"
        return self.state.wandb_run_id

    @property
    def global_batch_size(self) -> int:
        training_cfg = self.config.training
        return training_cfg.train_batch_size * self.accelerator.num_processes * training_cfg.gradient_accumulation_steps

    @property
    def unwrapped_policy(self) -> AtlasPolicy:
        return self.accelerator.unwrap_model(self.policy)

    def record(self, values: dict[str, Any], step: int) -> None:
        """Send scalars to the trackers and keep a local copy (`metrics.jsonl`) on the main process."""
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with (self.output_dir / METRICS_NAME).open("a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")


@dataclass
class TrainLosses:
    """The undivided micro-batch losses since the last `train/*` log; their mean is what is logged."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    micro_batches: int = 0

    def add(self, out: Mapping[str, torch.Tensor]) -> None:
        for key in TRAIN_METRICS:
            self.sums[key] = self.sums.get(key, 0) + out[key].detach().float()
        self.micro_batches += 1

    def means(self) -> torch.Tensor:
        """The mean of each of `TRAIN_METRICS` on this process, as one tensor."""
        return torch.stack([self.sums[key] / self.micro_batches for key in TRAIN_METRICS])

    def reset(self) -> None:
        self.sums, self.micro_batches = {}, 0


@dataclass
class Throughput:
    """Optimizer updates per second of this process's loop (a resumed run counts from its first step)."""

    first_step: int
    start: float = field(default_factory=time.perf_counter)
    steps_per_second: float = 0.0  # as last measured

    def measure(self, step: int) -> float:
        self.steps_per_second = (step - self.first_step) / max(time.perf_counter() - self.start, 1e-9)
        return self.steps_per_second


# ---------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------


def train(config: TrainConfig, *, wandb_run_id: str | None = None) -> Path:
    """Run one training job; returns the folder of the exported policy, or, when a stop signal ended it
    early (`preemption`), the checkpoint it saved (`--resume_from_checkpoint latest` continues from it).

    `wandb_run_id` attaches to an existing W&B run (e.g. the run a sweep agent created). A trial
    started by a W&B sweep agent (`sweep_trial_run_id`) writes into `<output_dir>/sweep-<run id>`,
    because all trials of a sweep share one command line and hence one `--output_dir`.
    """
    trial_id = sweep_trial_run_id()
    if trial_id is not None:
        folder = str(sweep_trial_dir(config.training.output_dir, trial_id))
        config = replace(config, training=replace(config.training, output_dir=folder))
        wandb_run_id = wandb_run_id or trial_id
    check_tracker_installed(config.trackers)
    if config.eval.every_steps:
        require_simulator()  # a missing [sim] extra fails now, not at the first evaluation hours later

    # 1. accelerator ------------------------------------------------------------------------------
    accelerator = _build_accelerator(config.training, config.logging.log_file, config.trackers)
    service = WandbService()  # started with the trackers; it outlives the stop signals that end this run
    # SIGTERM/SIGINT/SIGUSR1: stop at a step boundary with a checkpoint; the W&B run is finished inside too
    with StopRequest() as stop:
        try:
            return _run_stages(accelerator, config, wandb_run_id, stop, service)  # 2-7
        finally:
            try:
                accelerator.end_training()  # also after an error: trackers are closed, W&B files flushed
            finally:
                service.stop()
                # the run's prepared loaders go now: their worker processes, which ignore stop signals, exit
                # through their own shutdown instead of waiting for a SIGTERM at interpreter exit
                accelerator.free_memory()


def _run_stages(accelerator: Accelerator, config: TrainConfig, wandb_run_id: str | None, stop: StopRequest,
                service: WandbService) -> Path:
    run = setup_run(accelerator, config, wandb_run_id, service)  # 2-5
    throughput = fit(run, stop)  # 6
    if run.stopped_at is not None:
        return run.stopped_at
    return export_policy(run, throughput)  # 7


def main(argv: Sequence[str] | None = None) -> int:
    """`train.py` / `atlas-vla-train` / `python -m atlas_vla.train`: parse, validate, train."""
    argv = list(sys.argv[1:] if argv is None else argv)
    print_renames_as_one_line()
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    try:
        config = config_from_args(argv)
        train(config)
    except (ValueError, OSError) as error:  # bad input, or a save the disk refused: one line, nothing lost
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    return 0


def cache_features(config: TrainConfig, path: str | os.PathLike | None = None) -> Path:
    """`atlas-vla cache-features`: build (or find, when its key matches) the feature store of `config`'s training
    samples without training, at `path` or where `training.feature_store` (default `auto`) puts it. Under
    `accelerate launch` every process encodes its share of the shards."""
    training_cfg = replace(config.training, feature_store=config.training.feature_store or "auto")
    config = replace(config, training=training_cfg)  # validates: a stream or a trainable backbone is refused
    accelerator = _build_accelerator(training_cfg, None, [])
    train_samples, _, stats = _load_data(accelerator, config.data, config.model.sample_spec)
    policy = AtlasPolicy(config.model, stats)
    store = prepare_feature_store(accelerator, policy, train_samples, training_cfg, Path(path) if path else None)
    accelerator.end_training()
    return store.path


# ---------------------------------------------------------------------------------------------------
# 1-5. setup
# ---------------------------------------------------------------------------------------------------


def _build_accelerator(training_cfg: TrainingConfig, log_file: str | None, trackers: list[str]) -> Accelerator:
    """The accelerator, the process's logging, TF32 and the global seed (set before anything is built)."""
    output_dir = Path(training_cfg.output_dir)
    # checked on the process state, before the Accelerator fixes its precision for the whole process
    if training_cfg.mixed_precision == "fp16" and PartialState().device.type == "cpu":
        raise ValueError("training.mixed_precision fp16 needs a GPU; this run is on the CPU, where it would have no "
                         "effect: use bf16 (CPU autocast) or no")
    accelerator = Accelerator(
        gradient_accumulation_steps=training_cfg.gradient_accumulation_steps,
        mixed_precision=training_cfg.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # rank 0 may spend long in validation or media logging: keep the other ranks from timing out
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))],
    )
    _setup_logging(accelerator, log_file)
    if training_cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(training_cfg.seed)
    return accelerator


def _setup_logging(accelerator: Accelerator, log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file and accelerator.is_main_process:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    level = logging.INFO if accelerator.is_local_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=level, handlers=handlers, force=True)


def setup_run(accelerator: Accelerator, config: TrainConfig, wandb_run_id: str | None,
              service: WandbService) -> TrainingRun:
    """Stages 2-5 of `train` on a built accelerator: data, policy + optimizer + schedule, resume, trackers
    (W&B through `service`; the caller stops it after `accelerator.end_training()`).

    The order of these stages is the order in which random numbers are drawn; changing it changes
    the trained weights for the same seed.
    """
    output_dir = Path(config.training.output_dir)
    check_output_dir(output_dir)
    resume_dir = resolve_resume(output_dir, config.checkpoint.resume_from_checkpoint)
    if config.checkpoint.resume_from_checkpoint is None:
        check_fresh_output_dir(output_dir)  # retention would delete the new run's checkpoints, not the old
    train_samples, val_samples, stats = _load_data(accelerator, config.data, config.model.sample_spec)  # 2
    _check_one_batch(train_samples, config.training.train_batch_size, accelerator.num_processes)
    policy, references, counts = _build_policy(config.model, config.training, stats,  # 3
                                               resuming=resume_dir is not None)
    sampler = _source_sampler(train_samples, config.data, config.training.seed)
    if config.training.feature_store:
        store = prepare_feature_store(accelerator, policy, train_samples, config.training)
        train_samples = StoredFeatureSamples(train_samples, store, seed=config.training.seed)
    prepared = _prepare_optimization(accelerator, policy, train_samples, val_samples, config.training, references,
                                     sampler)
    run = TrainingRun(config=config, accelerator=accelerator, policy=prepared.policy, optimizer=prepared.optimizer,
                      scheduler=prepared.scheduler, train_loader=prepared.train_loader,
                      val_loader=prepared.val_loader, val_samples=val_samples, stats=stats, references=references,
                      parameter_counts=counts, max_steps=prepared.max_steps,
                      batches_per_epoch=prepared.batches_per_epoch, num_epochs=prepared.num_epochs)
    run.state = _resume(accelerator, resume_dir, config.checkpoint, output_dir, config.model)  # 4
    run.state.wandb_run_id = run.state.wandb_run_id or wandb_run_id or new_run_id()
    _start_trackers(run, fresh=resume_dir is None, service=service)  # 5
    return run


def _check_one_batch(train_samples: Any, batch_size: int, num_processes: int) -> None:
    """The training loader drops an epoch's last partial batch: fewer samples than one global batch would
    leave no update to run."""
    if hasattr(train_samples, "__len__") and len(train_samples) < batch_size * num_processes:
        raise ValueError(f"the training split has {len(train_samples)} samples, fewer than one batch of "
                         f"training.train_batch_size={batch_size} on each of {num_processes} process(es): "
                         f"lower the batch size or add data")


def _load_data(accelerator: Accelerator, data_cfg: DataConfig, spec: SampleSpec) -> tuple[Any, Any | None, NormStats]:
    """Stage 2: (training samples, validation samples or None for an empty split, normalisation statistics).

    The main process goes first, so that it alone writes the synthetic data and the `datasets` cache.
    """
    with accelerator.main_process_first():
        if data_cfg.generate_synthetic and not Path(data_cfg.source).exists():
            make_synthetic_libero(data_cfg.source)
        train_set, val_set = load_train_val(data_cfg)
        stats = _norm_stats(data_cfg, train_set)
    train_samples = build_samples(train_set, spec, data_cfg, train=True)
    val_samples = build_samples(val_set, spec, data_cfg) if _has_rows(val_set) else None
    return train_samples, val_samples, stats


def _norm_stats(data_cfg: DataConfig, train_set: Any) -> NormStats:
    if data_cfg.norm_stats:
        return NormStats.load(data_cfg.norm_stats)
    if not hasattr(train_set, "select_columns") or not hasattr(train_set, "__len__"):
        raise ValueError("data.streaming is on: compute statistics once with `atlas-vla compute-stats SOURCE "
                         "--output stats.json` and set data.norm_stats to that file")
    return compute_norm_stats(train_set, data_cfg.sources)


def _has_rows(dataset: Any) -> bool:
    """False for an empty split (e.g. val_fraction 0); a stream always counts as having rows."""
    try:
        return len(dataset) > 0
    except TypeError:
        return True


def _loader(samples: Any, training_cfg: TrainingConfig, shuffle: bool,
            sampler: torch.utils.data.Sampler | None = None) -> torch.utils.data.DataLoader:
    workers = training_cfg.dataloader_num_workers
    iterable = isinstance(samples, torch.utils.data.IterableDataset)
    return torch.utils.data.DataLoader(
        samples, batch_size=training_cfg.train_batch_size, shuffle=shuffle and not iterable and sampler is None,
        sampler=sampler,
        drop_last=shuffle, num_workers=workers, collate_fn=collate,
        # stored features are drawn per epoch (`StoredFeatureSamples.set_epoch`): workers must see each new epoch
        persistent_workers=workers > 0 and not isinstance(samples, StoredFeatureSamples),
        worker_init_fn=ignore_stop_signals,  # a preempted job's process group signal is the trainer's to handle
        # its own generator: creating an epoch's iterator must not consume the global RNG,
        # or a resumed run would draw different random numbers than an uninterrupted one
        generator=torch.Generator().manual_seed(training_cfg.seed),
    )


def _build_policy(model_cfg: PolicyConfig, training_cfg: TrainingConfig, stats: NormStats,
                  resuming: bool) -> tuple[AtlasPolicy, dict[str, Any], dict[str, int]]:
    """Stage 3a: the policy, the ids and weight hashes of its frozen encoders, and its parameter counts.

    `training.init_from` applies to a new run only: a resumed run's weights come from its checkpoint.
    """
    policy = AtlasPolicy(model_cfg, stats)
    references = policy.backbone_references()  # hash the frozen encoders once
    if training_cfg.init_from and not resuming:
        policy.load_trainable_weights(training_cfg.init_from)
        logger.info("initialised the trainable weights from %s", training_cfg.init_from)
    return policy, references, policy.num_parameters()


class Prepared(NamedTuple):
    """What `accelerator.prepare` returned, and the run length derived from the prepared loader."""

    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    val_loader: Any | None
    max_steps: int
    batches_per_epoch: int | None
    num_epochs: int


def _prepare_optimization(accelerator: Accelerator, policy: AtlasPolicy, train_samples: Any, val_samples: Any | None,
                          training_cfg: TrainingConfig, references: dict[str, Any],
                          sampler: torch.utils.data.Sampler | None) -> Prepared:
    """Stage 3b: the loaders, AdamW and the LR schedule, prepared; every checkpoint also exports the policy.

    `sampler` (source-weighted sampling) replaces the shuffled order of the training samples."""
    val_loader = _loader(val_samples, training_cfg, shuffle=False) if val_samples is not None else None
    train_loader = _loader(train_samples, training_cfg, shuffle=True, sampler=sampler)
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=training_cfg.learning_rate,
        betas=(training_cfg.adam_beta1, training_cfg.adam_beta2), eps=training_cfg.adam_epsilon,
        weight_decay=training_cfg.weight_decay,
    )
    policy, optimizer, train_loader = accelerator.prepare(policy, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    if accelerator.device.type == "cuda" and training_cfg.mixed_precision == "bf16":
        accelerator.unwrap_model(policy).cast_frozen(torch.bfloat16)
    try:
        batches_per_epoch = len(train_loader)
    except TypeError:
        batches_per_epoch = None  # streaming
    max_steps, num_epochs = _run_length(batches_per_epoch, training_cfg)
    # a prepared scheduler steps once per process per update: size it in process-steps
    scheduler = get_scheduler(training_cfg.lr_scheduler, optimizer,
                              num_warmup_steps=training_cfg.lr_warmup_steps * accelerator.num_processes,
                              num_training_steps=max_steps * accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)

    def export_hook(models: list, weights: list, folder: str) -> None:
        """Every checkpoint also holds the exported policy (`policy/`), loadable without training code."""
        if accelerator.is_main_process:
            accelerator.unwrap_model(models[0]).save_pretrained(Path(folder) / "policy", references=references)

    accelerator.register_save_state_pre_hook(export_hook)
    return Prepared(policy, optimizer, scheduler, train_loader, val_loader, max_steps, batches_per_epoch, num_epochs)


def _source_sampler(samples: Any, data_cfg: DataConfig, seed: int) -> SourceWeightedSampler | None:
    """The source-weighted sampler `data.source_weights` asks for (None: the usual shuffled order)."""
    if data_cfg.source_weights is None:
        return None
    return SourceWeightedSampler(samples.sample_sources, data_cfg.source_weights, seed)


def feature_store_path(training_cfg: TrainingConfig, key: StoreKey) -> Path:
    """Where `training.feature_store` puts the store for `key`: the folder given, or with `auto`
    `<output_dir>/../feature_stores/<key digest>`, which runs, seeds and sweep trials of one parent share."""
    if training_cfg.feature_store == "auto":
        return Path(training_cfg.output_dir).resolve().parent / "feature_stores" / key.digest()
    return Path(training_cfg.feature_store)


def prepare_feature_store(accelerator: Accelerator, policy: AtlasPolicy, train_samples: Any,
                          training_cfg: TrainingConfig, path: Path | None = None) -> FeatureStore:
    """The feature store of these training samples (at `path`, else `feature_store_path`): reused when its key
    matches, refused with the differing fields when not, built by every process of the run when absent.

    A file lock on `<store>.lock` makes a second run that wants the same store wait for the build, then reuse it."""
    key = StoreKey.for_policy(policy, train_samples, copies=training_cfg.cached_copies,
                              device_type=accelerator.device.type)
    path = path or feature_store_path(training_cfg, key)
    lock = None
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.parent / f".{path.name}.lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
    try:
        needs_build = [not is_complete(path)]
        if accelerator.num_processes > 1:
            broadcast_object_list(needs_build)
        if needs_build[0]:
            policy.to(accelerator.device)
            logger.info("building the feature store %s (%d samples x %d copies)", path, len(train_samples),
                        key.copies)
            store = build_store(path, train_samples, policy.vision_features, key, policy.vision_feature_shape(),
                                process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                                wait_for_everyone=accelerator.wait_for_everyone,
                                progress=accelerator.is_local_main_process)
        else:
            store = FeatureStore(path)
    finally:
        if lock is not None:
            lock.close()
    store.check_key(key)
    logger.info("training on the feature store %s: %d samples x %d copies (%.2f GB)", path, store.num_samples,
                store.copies, store.nbytes / 1e9)
    return store


def _run_length(batches_per_epoch: int | None, training_cfg: TrainingConfig) -> tuple[int, int]:
    """(max_steps, num_epochs): the optimizer updates to run and the epochs they span (a stream: unbounded)."""
    if training_cfg.max_train_steps is None and batches_per_epoch is None:
        raise ValueError("data.streaming is on: set training.max_train_steps (a stream has no epoch length)")
    accumulation = training_cfg.gradient_accumulation_steps
    updates_per_epoch = math.ceil(batches_per_epoch / accumulation) if batches_per_epoch else None
    max_steps = training_cfg.max_train_steps or training_cfg.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch) if updates_per_epoch else sys.maxsize
    return max_steps, num_epochs


def _resume(accelerator: Accelerator, resume_dir: Path | None, checkpoint_cfg: CheckpointConfig,
            output_dir: Path, model_cfg: PolicyConfig) -> TrainingState:
    """Stage 4: load the accelerator state from `resume_dir` and return where training stands (step 0 without)."""
    if resume_dir is None:
        if checkpoint_cfg.resume_from_checkpoint == "latest":
            logger.info("no checkpoint in %s yet: starting a new run", output_dir)
        return TrainingState(global_step=0, epoch=0, batches_in_epoch=0)
    state = TrainingState.load(resume_dir)  # a bad file fails before any state is touched
    try:
        accelerator.load_state(str(resume_dir))
    except Exception as error:
        raise ValueError(f"cannot resume from {resume_dir}: "
                         f"{_model_differences(resume_dir, model_cfg) or str(error).splitlines()[0]}") from None
    check_random_states_restored(resume_dir, accelerator.process_index)
    logger.info("resumed from %s at step %d", resume_dir, state.global_step)
    return state


def _drop_metrics_after(path: Path, step: int) -> None:
    """Rewrite `metrics.jsonl` (atomically) without the records of steps after `step`."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))


def _model_differences(checkpoint: Path, model_cfg: PolicyConfig) -> str | None:
    """'it was saved with model.a = x (this config: y), ...' when the checkpoint's `config.yaml` has another
    model section than this run; None when they agree or the file cannot be read."""
    try:
        saved = flatten({"model": load_yaml(checkpoint / "config.yaml").get("model", {})})
    except (OSError, ValueError):
        return None
    mine = flatten({"model": to_dict(model_cfg)})
    differ = [f"{key} = {saved.get(key)!r} (this config: {mine.get(key)!r})"
              for key in sorted(set(saved) | set(mine)) if saved.get(key) != mine.get(key)]
    return f"it was saved with {', '.join(differ)}; resume with the same model settings" if differ else None


def _start_trackers(run: TrainingRun, fresh: bool, service: WandbService) -> None:
    """Stage 5: save the config and statistics, start the local metric log and the trackers, store the run id.

    A `fresh` (not resumed) run starts its local metric log anew; a resumed one appends to it.
    """
    accelerator, config, output_dir, trackers = run.accelerator, run.config, run.output_dir, run.trackers
    training_cfg = config.training
    setup = {"num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
             "mixed_precision": training_cfg.mixed_precision,
             "gradient_accumulation_steps": training_cfg.gradient_accumulation_steps,
             "micro_batch_size": training_cfg.train_batch_size, "global_batch_size": run.global_batch_size,
             "max_train_steps": run.max_steps}
    tracked = {**to_dict(config), "setup": setup, "parameters": run.parameter_counts,
               "norm_stats_fingerprint": run.stats.fingerprint}
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
        run.stats.save(output_dir / "norm_stats.json")
        if fresh:
            (output_dir / METRICS_NAME).write_text("")
        else:  # the steps after the checkpoint are run again: their earlier records go
            _drop_metrics_after(output_dir / METRICS_NAME, run.state.global_step)
            apply_retention(output_dir, config.checkpoint.checkpoints_total_limit)
    if trackers:
        if "wandb" in trackers and accelerator.is_main_process:
            service.start()
        wandb_kwargs = {"wandb": wandb_init_kwargs(config.wandb, output_dir, run.run_id)} if "wandb" in trackers else {}
        accelerator.init_trackers(config.wandb.project, config=flatten(tracked), init_kwargs=wandb_kwargs)
        if "wandb" in trackers and accelerator.is_main_process:
            # inside a sweep wandb ignores the id we pass and uses the agent's: store the id of the run
            # that really exists (the main process alone writes the id file and the checkpoint state)
            run.state.wandb_run_id = accelerator.get_tracker("wandb", unwrap=True).id
    if accelerator.is_main_process:
        write_text_atomic(output_dir / RUN_ID_FILE, run.run_id + "\n")
    logger.info("setup: %s; parameters: %s", setup, run.parameter_counts)


# ---------------------------------------------------------------------------------------------------
# 6. the loop
# ---------------------------------------------------------------------------------------------------


def fit(run: TrainingRun, stop: StopRequest | None = None) -> Throughput:
    """Stage 6 of `train`: optimizer updates until `run.max_steps`, and after each what is due.

    Every micro-batch is one forward/backward; every `gradient_accumulation_steps` of them make one
    optimizer update (`global_step`), after which the train metrics are logged, the policy is
    validated, evaluated in the simulator and checkpointed, each at its own interval. When a rank
    received a stop signal, every rank stops after the same update with a checkpoint (`stop_training`).
    """
    config, state, max_steps = run.config, run.state, run.max_steps
    baseline = (baseline_metrics(run.val_loader, run.stats, config.training.num_validation_batches)
                if run.val_loader is not None else {})
    progress = tqdm(total=max_steps, initial=state.global_step, desc="train",
                    disable=not run.accelerator.is_local_main_process)
    losses = TrainLosses()
    validations = 0
    throughput = Throughput(first_step=state.global_step)
    run.policy.train()
    if stop is not None:
        stop.training = True
    for batch in _train_batches(run):
        out = update_policy(run, batch, config.training.max_grad_norm)
        state.batches_in_epoch += 1
        losses.add(out)
        if not run.accelerator.sync_gradients:
            continue  # a micro-batch of an update that is still accumulating gradients
        state.global_step += 1
        progress.update(1)
        step = state.global_step
        if is_log_step(step, max_steps, config.logging):
            log_train_metrics(run, losses, throughput, progress)
        if run.val_loader is not None and is_validation_step(step, max_steps, config.training):
            validations += 1
            run_validation(run, baseline, config.training.num_validation_batches)
            log_validation_media(run, validations, config.logging)
        if is_sim_eval_step(step, config.eval):
            run_sim_evaluation(run, config.eval)
        saved = is_checkpoint_step(step, max_steps, config.checkpoint)
        if saved:
            save_training_checkpoint(run, config.checkpoint)
        if step >= max_steps:
            break
        if stop is not None:
            wait_for_test(step, run.output_dir, stop, run.accelerator.process_index)
            if stop.agreed(run.accelerator):
                stop_training(run, stop, saved)
                break
    progress.close()
    return throughput


def _train_batches(run: TrainingRun) -> Iterator[Any]:
    """The training micro-batches from where `run.state` stands until training ends, epoch after epoch.

    A resumed run first skips the batches its epoch had already consumed. Each exhausted epoch
    advances `run.state` to the next one; the caller stops iterating after the last update.
    """
    state = run.state
    while state.global_step < run.max_steps and state.epoch < run.num_epochs:
        if hasattr(run.train_loader, "set_epoch"):
            run.train_loader.set_epoch(state.epoch)
        if hasattr(run.train_loader.dataset, "set_epoch"):  # Accelerate skips it when the sampler has one
            run.train_loader.dataset.set_epoch(state.epoch)
        if state.batches_in_epoch:
            yield from run.accelerator.skip_first_batches(run.train_loader, state.batches_in_epoch)
        else:
            yield from run.train_loader
        state.epoch += 1
        state.batches_in_epoch = 0


def update_policy(run: TrainingRun, batch: Mapping[str, Any], max_grad_norm: float | None) -> dict[str, torch.Tensor]:
    """Forward and backward one micro-batch; returns the policy's losses.

    Under `accelerator.accumulate` the gradients are clipped and the optimizer, the schedule and
    the zeroing take effect only on the micro-batch that completes an update (`sync_gradients`).
    """
    accelerator = run.accelerator
    with accelerator.accumulate(run.policy):
        out = run.policy(batch)
        accelerator.backward(out["loss"])
        if accelerator.sync_gradients and max_grad_norm:
            accelerator.clip_grad_norm_(run.policy.parameters(), max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return out


def is_log_step(step: int, max_steps: int, logging_cfg: LoggingConfig) -> bool:
    """`train/*` metrics every `log_every_steps` updates and after the last one."""
    return step % logging_cfg.log_every_steps == 0 or step == max_steps


def is_validation_step(step: int, max_steps: int, training_cfg: TrainingConfig) -> bool:
    """Validation every `validate_every_steps` updates and after the last one."""
    return step % training_cfg.validate_every_steps == 0 or step == max_steps


def is_sim_eval_step(step: int, eval_cfg: EvalConfig) -> bool:
    """Simulator evaluation every `every_steps` updates (not at the end); never when it is unset."""
    return bool(eval_cfg.every_steps) and step % eval_cfg.every_steps == 0


def is_checkpoint_step(step: int, max_steps: int, checkpoint_cfg: CheckpointConfig) -> bool:
    """A checkpoint every `save_every_steps` updates and after the last one."""
    return step % checkpoint_cfg.save_every_steps == 0 or step == max_steps


def is_video_validation(validation: int, logging_cfg: LoggingConfig) -> bool:
    """Whether the `validation`-th validation (counted from 1) logs an episode video.

    The 1st does, and then every N-th after it (N = `video_every_validations`): validations
    1, N+1, 2N+1, ...; N = 0 means never.
    """
    every = logging_cfg.video_every_validations
    return every != 0 and (validation - 1) % every == 0


def log_train_metrics(run: TrainingRun, losses: TrainLosses, throughput: Throughput, progress: tqdm) -> None:
    """Log the `train/*` metrics: losses averaged over the micro-batches since the last log and over processes."""
    state = run.state
    step = state.global_step
    means = run.accelerator.reduce(losses.means(), "mean")
    logs = {f"train/{k}": float(v) for k, v in zip(TRAIN_METRICS, means)}
    logs.update({"train/lr": run.scheduler.get_last_lr()[0], "train/step": step,
                 "train/epoch": state.epoch + state.batches_in_epoch / (run.batches_per_epoch or math.inf),
                 "train/steps_per_second": throughput.measure(step)})
    run.record(logs, step)  # custom metrics: add them to `logs` here
    progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
    losses.reset()


def validate(accelerator: Accelerator, policy: torch.nn.Module, loader: Iterable, limit: int | None) -> dict[str, float]:
    """Mean `val/*` metrics over up to `limit` batches per process, averaged across processes."""
    totals, count = metric_sums(policy, loader, limit)
    if not count:
        return {}
    means = accelerator.reduce((totals / count).to(accelerator.device), reduction="mean")
    return {f"val/{key}": float(value) for key, value in zip(VAL_METRICS, means)}


def run_validation(run: TrainingRun, baseline: Mapping[str, float], num_batches: int | None) -> None:
    """Log the `val/*` metrics of the policy next to those of the mean-action baseline (`val/baseline_*`)."""
    step = run.state.global_step
    val_logs = validate(run.accelerator, run.policy, run.val_loader, num_batches)
    val_logs.update({f"val/baseline_{k}": v for k, v in baseline.items()})
    run.record(val_logs, step)
    logger.info("step %d %s", step, metrics_table(val_logs))


def log_validation_media(run: TrainingRun, validation: int, logging_cfg: LoggingConfig) -> None:
    """W&B images and a table of the first validation samples' actions, and on some validations an episode video.

    Main process and W&B only, and only for an indexable validation split; `validation` counts the
    validations from 1 (see `is_video_validation`).
    """
    samples, accelerator = run.val_samples, run.accelerator
    indexable = not isinstance(samples, torch.utils.data.IterableDataset)
    if not (logging_cfg.log_media and indexable and accelerator.is_main_process and "wandb" in run.trackers):
        return
    step = run.state.global_step
    policy = run.unwrapped_policy
    media = collate([samples[i] for i in range(min(logging_cfg.num_media_samples, len(samples)))])
    video = (_episode_video(policy, samples, run.output_dir / "media" / f"val_episode_{step}.mp4")
             if is_video_validation(validation, logging_cfg) else None)
    log_media(accelerator, step, media[OBS_IMAGES][:, 0], list(media[INSTRUCTION]),
              policy.predict_action_chunk(media), media[ACTIONS], video)


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


def run_sim_evaluation(run: TrainingRun, eval_cfg: EvalConfig) -> None:
    """Evaluate in the LIBERO simulator on the main process and log `eval/*` and the videos; the other ranks wait.

    A failed evaluation (e.g. every worker died) is logged as an error and skipped: it must not end training.
    """
    accelerator, step = run.accelerator, run.state.global_step
    if accelerator.is_main_process:
        try:
            metrics, videos = evaluate_in_simulator(run.unwrapped_policy, eval_cfg, run.output_dir, run.references,
                                                    step)
            run.record(metrics, step)
            log_videos(accelerator, step, videos)
        except Exception as error:
            logger.error("step %d: the LIBERO simulator evaluation failed and is skipped, training "
                         "continues: %s: %s", step, type(error).__name__, error)
    # the other ranks wait here (2 h process-group timeout); after a failed evaluation too
    accelerator.wait_for_everyone()


def evaluate_in_simulator(policy: AtlasPolicy, eval_cfg: EvalConfig, output_dir: Path, references: dict,
                          step: int) -> tuple[dict[str, float], dict[str, str]]:
    """Closed-loop LIBERO success rates of the current policy (main process): the `eval/*` scalars and
    the episode videos (logged key -> mp4), as `atlas-vla eval-libero` logs them."""
    from atlas_vla.eval import libero_sim as sim

    sim.require_simulator()
    folder = Path(output_dir) / "eval" / f"step-{step}"
    specs = sim.episode_specs(eval_cfg, video_dir=folder / "videos")
    policy_dir = policy.save_pretrained(folder / "policy", references=references)
    summary = sim.summarize(sim.evaluate(str(policy_dir), specs, num_workers=eval_cfg.num_workers))
    sim.save_results(folder / "results.json", eval_cfg.suite, summary, {"step": step})
    metrics = sim.eval_metrics(eval_cfg.suite, summary)
    logger.info("step %d %s", step, metrics_table(metrics))
    return metrics, sim.episode_videos(summary)


def save_training_checkpoint(run: TrainingRun, checkpoint_cfg: CheckpointConfig) -> Path:
    """Save `checkpoints/checkpoint-{step}` with the state a resumed run continues from, and apply retention."""
    state = run.state
    saved = TrainingState(state.global_step, state.epoch, state.batches_in_epoch, run.run_id)
    if state.batches_in_epoch == run.batches_per_epoch:  # this update ended the epoch: resume at the next one
        saved = TrainingState(state.global_step, state.epoch + 1, 0, run.run_id)
    return save_checkpoint(run.accelerator, run.output_dir, saved, checkpoint_cfg.checkpoints_total_limit,
                           {"config.yaml": config_yaml(run.config)})


def stop_training(run: TrainingRun, stop: StopRequest, saved: bool) -> None:
    """Every rank, after the update at which they agreed to stop: checkpoint this step (unless `saved`
    already), mark the W&B run as preempting and tell `launch.sh`; `train` then closes the trackers."""
    step = run.state.global_step
    folder = (checkpoints_dir(run.output_dir) / f"checkpoint-{step}" if saved
              else save_training_checkpoint(run, run.config.checkpoint))
    run.stopped_at = folder
    if run.accelerator.is_main_process:
        if "wandb" in run.trackers:
            run.accelerator.get_tracker("wandb", unwrap=True).mark_preempting()
        message = (f"stopped by {stop.describe()} after step {step} of {run.max_steps}; checkpoint saved in {folder}; "
                   f"continue with --resume_from_checkpoint latest")
        logger.warning(message)
        record_stop(message)


# ---------------------------------------------------------------------------------------------------
# 7. export
# ---------------------------------------------------------------------------------------------------


def export_policy(run: TrainingRun, throughput: Throughput) -> Path:
    """Stage 7 of `train`: the final policy in `final/`, `train_summary.json`, and the Hub upload if asked for."""
    accelerator, output_dir, training_cfg = run.accelerator, run.output_dir, run.config.training
    checksums = _rank_checksums(accelerator, run.unwrapped_policy)
    final_dir = output_dir / FINAL_DIR
    if accelerator.is_main_process:
        policy = run.unwrapped_policy
        policy.save_pretrained(final_dir, references=run.references)
        summary = {"global_step": run.state.global_step, "num_processes": accelerator.num_processes,
                   "global_batch_size": run.global_batch_size, "rank_weight_checksums": checksums,
                   "wandb_run_id": run.run_id if "wandb" in run.trackers else None,
                   "parameters": run.parameter_counts, "seconds": time.perf_counter() - throughput.start,
                   "train_steps_per_second": throughput.steps_per_second}
        write_json_atomic(output_dir / SUMMARY_NAME, summary)
        if training_cfg.push_to_hub:
            policy.push_to_hub(training_cfg.hub_model_id or output_dir.name)
        logger.info("exported the policy to %s", final_dir)
    accelerator.wait_for_everyone()
    return final_dir


def _rank_checksums(accelerator: Accelerator, policy: torch.nn.Module) -> list[float]:
    """One checksum of the trainable weights per rank (they must all agree under DDP)."""
    total = sum(p.detach().double().sum() for p in policy.parameters())
    return [float(v) for v in accelerator.gather(total.reshape(1).to(accelerator.device).float())]
