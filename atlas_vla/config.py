"""Training configuration: nested dataclasses, YAML files, dotted command-line overrides.

A run is described by one `TrainConfig` with the sections `model` (`PolicyConfig`), `data`
(`DataConfig`), `training`, `checkpoint`, `logging`, `wandb` and `eval`. It is read from a YAML file and
then overridden from the command line, either with dotted keys (`--training.learning_rate 1e-4`)
or with the familiar diffusers-style flags, which are aliases of those keys (`--learning_rate 1e-4`).
Every value is checked against its field's type; an unknown key or flag fails with the closest valid
name; a key that was renamed keeps working under its old name with a deprecation warning. The resolved
config is saved with every checkpoint and sent to the tracker. Reading a config imports neither torch
nor datasets: the sections are light dataclasses (`atlas_vla.models.config`, `atlas_vla.data.config`,
`atlas_vla.eval.config`).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Sequence

import yaml

from atlas_vla.data.config import DataConfig, check_sources_exist, shifts_anything
from atlas_vla.eval.config import EvalConfig
from atlas_vla.files import write_text_atomic
from atlas_vla.hub import absolute_path, resolve_local
from atlas_vla.models.config import MINILM, PolicyConfig
from atlas_vla.schema import dotted_keys, from_dict, renamed_dotted_keys, suggest, to_dict, warn_renamed
from atlas_vla.wandb_artifacts import check_reference, is_wandb_reference, success_rate_suite

# `transformers.get_scheduler` names that every supported transformers has (a test checks them): a
# config naming one is read without importing transformers (and with it torch); any other name is
# checked against the installed transformers
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
# transformers schedules the training loop cannot drive: it steps every schedule once per update, with no metric
_FOLLOWS_A_METRIC = "it sets the rate from a metric, and the loop steps schedules on the update count alone"
REFUSED_SCHEDULERS = {"reduce_lr_on_plateau": _FOLLOWS_A_METRIC, "greedy": _FOLLOWS_A_METRIC}


@dataclass
class TrainingConfig:
    """Optimisation and the training loop."""

    output_dir: str = "outputs/atlas"  # checkpoints, the exported policy, W&B files and logs go here
    init_from: str | None = None  # fine-tune from a saved policy's trainable weights (folder, Hub id or wandb:...)
    seed: int = 0
    train_batch_size: int = 32  # micro-batch per process; global batch = this x processes x accumulation
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None  # optimizer updates; null = num_train_epochs full epochs
    num_train_epochs: int = 10
    learning_rate: float = 1e-4
    # the locate read-out's and the pixel stem's learning rate (null: learning_rate): they learn where things are,
    # and only the samples that carry positions teach them
    locate_learning_rate: float | None = None
    # the schedule of that rate (null: lr_scheduler), e.g. constant_with_warmup while the rest decays: the read-out
    # finds things only after thousands of updates at a high rate, and a decaying rate stops it before then
    locate_lr_scheduler: str | None = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "cosine"  # any transformers.get_scheduler name: linear, cosine, constant_with_warmup, ...
    lr_warmup_steps: int = 500  # optimizer updates of linear warm-up
    max_grad_norm: float | None = 1.0  # gradient clipping; null = off
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    allow_tf32: bool = False  # TF32 matmuls on Ampere+ GPUs
    dataloader_num_workers: int = 2
    feature_store: str | None = None  # a folder, or "auto" (<output_dir>/../feature_stores/<key>): run the frozen
    # VGGT once per training sample into a store on disk and train on it (no backbone in the step); null = live
    cached_copies: int = 1  # with data.random_shift: differently shifted copies stored per sample, one drawn per use
    cache_frozen_features: bool = False  # deprecated: true means feature_store: auto
    validate_every_steps: int = 500  # run validation every N optimizer updates (and at the end)
    # batches per validation (per process), of samples spread over the whole split; null = the whole split
    num_validation_batches: int | None = 20
    report_to: Literal["wandb", "tensorboard", "all", "none"] | None = None  # null = W&B if wandb.enabled
    push_to_hub: bool = False  # upload the final policy (needs `huggingface-cli login` or HF_TOKEN)
    hub_model_id: str | None = None  # Hub repo for push_to_hub; null = the output folder's name

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"validation_steps": "validate_every_steps"}

    def __post_init__(self) -> None:
        check_reference(self.init_from, "training.init_from")
        if self.cache_frozen_features:
            warn_renamed("training.cache_frozen_features: true", "training.feature_store: auto")
            self.feature_store, self.cache_frozen_features = self.feature_store or "auto", False
        if self.feature_store is not None and (not isinstance(self.feature_store, str) or not self.feature_store):
            raise ValueError(f"training.feature_store must be a folder, auto or null, got {self.feature_store!r}")
        positive = ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "validate_every_steps",
                    "cached_copies")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_steps", "num_validation_batches"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1 or null, got {getattr(self, name)}")
        if self.lr_warmup_steps < 0 or self.learning_rate <= 0:
            raise ValueError(f"training.learning_rate ({self.learning_rate}) must be > 0 and lr_warmup_steps "
                             f"({self.lr_warmup_steps}) >= 0")
        if self.locate_learning_rate is not None and not self.locate_learning_rate > 0:
            raise ValueError(f"training.locate_learning_rate must be > 0 or null, got {self.locate_learning_rate}")
        for key in ("lr_scheduler", "locate_lr_scheduler"):
            name = getattr(self, key)
            if name in REFUSED_SCHEDULERS:
                raise ValueError(f"training.{key} {name!r} is not supported: {REFUSED_SCHEDULERS[name]}; expected one "
                                 f"of {list(LR_SCHEDULERS)}")
            if name is not None and name not in LR_SCHEDULERS:
                from transformers import SchedulerType

                names = [s.value for s in SchedulerType]
                if name not in names:
                    raise ValueError(f"training.{key} {name!r} is not a transformers scheduler; "
                                     f"expected one of {names}{suggest(name, names)}")

    def locate_group(self) -> tuple[float, str] | None:
        """The locating parameters' own (rate, schedule), each falling back to the rest's, when either key gives them
        a group of their own; None when they share the rest's."""
        if self.locate_learning_rate is None and self.locate_lr_scheduler is None:
            return None
        return self.locate_learning_rate or self.learning_rate, self.locate_lr_scheduler or self.lr_scheduler


@dataclass
class CheckpointConfig:
    """Where and how often training state is saved, and where to resume from."""

    save_every_steps: int = 1000  # save output_dir/checkpoints/checkpoint-{step} every N optimizer updates
    checkpoints_total_limit: int | None = 3  # keep the newest N checkpoints; null = keep all
    resume_from_checkpoint: str | None = None  # a checkpoint folder, "latest" in output_dir/checkpoints, or wandb:...

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"checkpointing_steps": "save_every_steps"}

    def __post_init__(self) -> None:
        check_reference(self.resume_from_checkpoint, "checkpoint.resume_from_checkpoint")
        if self.save_every_steps < 1:
            raise ValueError(f"checkpoint.save_every_steps must be >= 1, got {self.save_every_steps}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoint.checkpoints_total_limit must be >= 1 or null, "
                             f"got {self.checkpoints_total_limit}")


@dataclass
class LoggingConfig:
    """Console, file and rich-media logging."""

    log_every_steps: int = 10  # scalar train/* metrics every N optimizer updates
    log_file: str | None = None  # also write the log to this file (the launch.sh --log flag tees everything)
    log_media: bool = True  # camera frames with actions (images) and per-sample predictions (table)
    num_media_samples: int = 4  # samples in those images and tables
    video_every_validations: int = 5  # a validation episode video every N validations; 0 = never

    def __post_init__(self) -> None:
        if self.log_every_steps < 1:
            raise ValueError(f"logging.log_every_steps must be >= 1, got {self.log_every_steps}")


@dataclass
class WandbConfig:
    """Weights & Biases run settings (the API key comes from `wandb login` or WANDB_API_KEY, never from here)."""

    enabled: bool = False  # log to W&B (same as --report_to wandb or --wandb)
    project: str = "atlas-vla"
    entity: str | None = None  # null = your default entity
    name: str | None = None  # null = generated from the output folder and the time
    group: str | None = None  # null = the run's id; `atlas-vla eval-watch` logs its eval run into this group
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    save_code: bool = True  # upload the training code with the run
    resume: Literal["allow", "must", "never", "auto"] = "allow"  # how a resumed job re-attaches to its run
    disable_stats: bool = False  # turn off system metrics (GPU/CPU utilisation and memory)
    # the policy as a versioned W&B artifact (`atlas-policy-<run id>`): none | final (one version, at the end) |
    # best (a version whenever best_metric improves at a checkpoint) | all (every checkpoint)
    log_model: Literal["none", "final", "best", "all"] = "final"
    # null: eval/success_rate where simulator evaluations run during training, else val/pose_l1_error; a suite's
    # success rate (eval/success_rate, eval/<suite>/success_rate) is also measured by evaluations attached later
    best_metric: str | None = None
    log_checkpoints: bool = False  # also the full training state (`atlas-checkpoint-<run id>`), to resume elsewhere


@dataclass
class TrainConfig:
    """One training run."""

    model: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        metric = self.wandb.best_metric
        if metric is not None and not (metric.startswith("val/") or metric.startswith("eval/")):
            raise ValueError(f"wandb.best_metric: {metric} is not a validation (val/...) or simulator (eval/...) "
                             f"metric, e.g. val/pose_l1_error or eval/success_rate")
        if metric is not None and metric.startswith("eval/") and not self.eval.every_steps:
            if success_rate_suite(metric, self.eval.suite) is None:
                raise ValueError(f"wandb.best_metric: {metric} is logged only by simulator evaluations during "
                                 f"training: set eval.every_steps, or follow a val/... metric or a suite's success "
                                 f"rate (which evaluations attached later measure)")
            if self.wandb.log_model == "best":
                raise ValueError(f"wandb.log_model: best logs a version only when the training run measures "
                                 f"wandb.best_metric ({metric}), and it runs no simulator evaluation: set "
                                 f"eval.every_steps, or log_model: all (eval-watch's results then move best)")
        store = self.training.feature_store
        if store and (self.data.streaming or not self.model.freeze_vggt):
            raise ValueError(f"training.feature_store: {store} needs data.streaming: false (got "
                             f"{self.data.streaming}) and model.freeze_vggt: true (got {self.model.freeze_vggt})")
        if isinstance(self.data.random_shift, list) and not self.model.use_wrist_camera and any(
                self.data.random_shift[1:]):
            raise ValueError(f"data.random_shift: {self.data.random_shift} shifts the wrist camera, and "
                             f"model.use_wrist_camera is false: give the agent view's shift alone, e.g. "
                             f"{self.data.random_shift[0]}")
        if self.training.cached_copies > 1 and not (store and shifts_anything(self.data.random_shift)):
            raise ValueError(f"training.cached_copies: {self.training.cached_copies} stores differently shifted copies "
                             f"of each sample: it needs training.feature_store (got {store}) and data.random_shift "
                             f"> 0 (got {self.data.random_shift}); otherwise every copy is the same")
        locating = self.model.locate_weight > 0 or self.model.pixel_stem
        for key, what in (("locate_learning_rate", "rate"), ("locate_lr_scheduler", "schedule")):
            if getattr(self.training, key) is not None and not locating:
                raise ValueError(f"training.{key}: {getattr(self.training, key)} sets the {what} of the locate "
                                 f"read-out and the pixel stem, and this model has neither: set model.locate_weight "
                                 f"> 0 or model.pixel_stem: true, or leave it null")

    @property
    def trackers(self) -> list[str]:
        """Accelerate `log_with` names: from `training.report_to`, else W&B when `wandb.enabled`."""
        report_to = self.training.report_to
        if report_to is None:
            return ["wandb"] if self.wandb.enabled else []
        return {"wandb": ["wandb"], "tensorboard": ["tensorboard"], "all": ["wandb", "tensorboard"], "none": []}[report_to]


# diffusers-style flags -> config keys (a flag is just a shorter name for the key)
FLAG_ALIASES: dict[str, str] = {
    "output_dir": "training.output_dir",
    "seed": "training.seed",
    "train_batch_size": "training.train_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "max_train_steps": "training.max_train_steps",
    "num_train_epochs": "training.num_train_epochs",
    "learning_rate": "training.learning_rate",
    "lr_scheduler": "training.lr_scheduler",
    "lr_warmup_steps": "training.lr_warmup_steps",
    "max_grad_norm": "training.max_grad_norm",
    "mixed_precision": "training.mixed_precision",
    "allow_tf32": "training.allow_tf32",
    "dataloader_num_workers": "training.dataloader_num_workers",
    "validation_steps": "training.validate_every_steps",
    "report_to": "training.report_to",
    "push_to_hub": "training.push_to_hub",
    "hub_model_id": "training.hub_model_id",
    "checkpointing_steps": "checkpoint.save_every_steps",
    "checkpoints_total_limit": "checkpoint.checkpoints_total_limit",
    "resume_from_checkpoint": "checkpoint.resume_from_checkpoint",
    "log": "logging.log_file",
    "tracker_project_name": "wandb.project",
    "wandb": "wandb.enabled",
    "dataset": "data.source",
    "init_from": "training.init_from",
    "eval_libero_steps": "eval.every_steps",
}


# ----------------------------------------------------------------------------------------------
# files and command line
# ----------------------------------------------------------------------------------------------


class _Yaml12BooleansLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false (any case) are booleans, so the values
    `no`, `off`, `yes`, `on`, `y`, `n` stay the strings the user typed (`--mixed_precision no`, as in Accelerate)."""


_Yaml12BooleansLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12BooleansLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                            list("tTfF"))


def parse_yaml(text: str) -> Any:
    """YAML text (a config file or one flag's value) -> Python values, with YAML 1.2 booleans."""
    return yaml.load(text, Loader=_Yaml12BooleansLoader)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into a dict (empty file -> {})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of sections (model, data, training, ...), got {type(values).__name__}")
    return values


def is_train_option(flag: str) -> bool:
    """Whether `--flag` is one of train.py's options: a dotted config key (or its old name) or a flag alias."""
    name = flag[2:].split("=", 1)[0] if flag.startswith("--") else flag
    return (name == "config" or name in FLAG_ALIASES or name in dotted_keys(TrainConfig)
            or name in renamed_dotted_keys(TrainConfig))


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `value` at the dotted `TrainConfig` key (`training.seed`) in the nested dict `values`.

    A renamed key works under its old name, with a deprecation warning; an unknown one fails with
    the closest valid key or flag.
    """
    renamed = renamed_dotted_keys(TrainConfig)
    if dotted in renamed:
        warn_renamed(f"--{dotted}", f"--{renamed[dotted]}")
        dotted = renamed[dotted]
    keys = dotted_keys(TrainConfig)
    if dotted not in keys:
        names = keys + [f"--{alias}" for alias in FLAG_ALIASES]
        raise ValueError(f"unknown option --{dotted}{suggest(dotted, names)}")
    node = values
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set --{dotted}: {part} is not a section")
    node[last] = value


def parse_overrides(argv: Sequence[str]) -> tuple[str | None, dict[str, Any]]:
    """Split `argv` into the `--config` path and a nested dict of overrides.

    Accepts `--key value`, `--key=value` and bare boolean flags (`--wandb`, `--allow_tf32`). Keys are
    dotted config keys or `FLAG_ALIASES`. Values are parsed as YAML scalars (`null`, `true`, `[4, 11]`).
    """
    config_path = None
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"unexpected argument {token!r}; options look like --training.learning_rate 1e-4")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        i += 1
        if key == "config":
            config_path = value
            continue
        try:
            parsed = parse_yaml(value) if value else value
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, str):
            parsed = value  # keep strings exactly as typed
        set_dotted(overrides, FLAG_ALIASES.get(key, key), parsed)
    return config_path, overrides


def merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively update `base` with `overrides` (a new dict)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """A `TrainConfig` from a YAML file (or the defaults) plus overrides, validated, its paths absolute.

    Every relative path, in the file or in `overrides`, is read against the working directory of the caller
    (`with_absolute_paths`). A `data.source` given in `overrides` turns the file's `data.generate_synthetic`
    off unless `overrides` sets that too: synthetic data is only ever written where the config file itself
    points, never in place of a source someone named (a mistyped path is then an error, not a synthetic run).
    """
    values = load_yaml(path) if path is not None else {}
    overrides = dict(overrides or {})
    data_overrides = overrides.get("data") or {}
    if "source" in data_overrides and "generate_synthetic" not in data_overrides:
        overrides["data"] = {**data_overrides, "generate_synthetic": False}
    values = merge(values, overrides)
    try:
        return with_absolute_paths(from_dict(TrainConfig, values, "config"))
    except ValueError as error:
        if path is None:
            raise
        raise ValueError(f"{path}: {error}") from None


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """`config` with every local path absolute against the working directory (`hub.resolve_local`: Hub ids stay
    as they are): what the run reads, and what its `config.yaml` records, wherever that is read again."""

    def absolute(path: str | None, *keep: str) -> str | None:
        return path if path is None or path in keep else absolute_path(path)

    def local(name: str | None, *keep: str) -> str | None:
        return name if name is None or name in keep else resolve_local(name)

    data, model, training = config.data, config.model, config.training
    if data.generate_synthetic:  # a folder the run writes: local, however much it looks like a Hub id
        source: str | list[str] = absolute(data.source)  # a single source (DataConfig checks it)
    else:
        source = [local(s) for s in data.sources] if isinstance(data.source, list) else local(data.source)
    data = replace(data, source=source, norm_stats=absolute(data.norm_stats), cache_dir=absolute(data.cache_dir))
    model = replace(model, vggt_pretrained=local(model.vggt_pretrained),
                    language=replace(model.language, model_name_or_path=local(model.language.model_name_or_path,
                                                                              MINILM)))
    training = replace(training, output_dir=absolute(training.output_dir), init_from=local(training.init_from),
                       feature_store=absolute(training.feature_store, "auto"))
    resume = config.checkpoint.resume_from_checkpoint
    checkpoint = replace(config.checkpoint,
                         resume_from_checkpoint=resume if is_wandb_reference(resume) else absolute(resume, "latest"))
    logging_cfg = replace(config.logging, log_file=absolute(config.logging.log_file))
    return replace(config, data=data, model=model, training=training, checkpoint=checkpoint, logging=logging_cfg)


def config_from_args(argv: Sequence[str]) -> TrainConfig:
    """The command-line entry: `--config FILE` plus overrides."""
    path, overrides = parse_overrides(argv)
    return load_config(path, overrides)


def check_args(argv: Sequence[str]) -> int:
    """0 when train.py's flags `argv` give a valid config, else 2 after one error line on stderr.

    `launch.sh` runs this (`python -m atlas_vla.config ARGS`, no torch import) before starting any
    process, so a mistyped flag or a missing data source is reported once instead of once per rank plus a
    launcher traceback."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecations are printed once, by the trainer
        try:
            check_sources_exist(config_from_args(argv).data)
        except (ValueError, FileNotFoundError) as error:
            print(f"train.py: error: {error}", file=sys.stderr)
            return 2
    return 0


def config_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML text (what `config.yaml` of a run and of every checkpoint holds)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_config(config: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    return write_text_atomic(path, config_yaml(config))


def usage() -> str:
    """Help text: the flags and the config sections."""
    flags = "\n".join(f"  --{alias:<28} = --{key}" for alias, key in FLAG_ALIASES.items())
    return (
        "usage: train.py [--config FILE] [--section.key VALUE ...] [--flag VALUE ...]\n\n"
        "Config sections (YAML keys, settable as --section.key): model, data, training, checkpoint, logging, wandb, "
        "eval.\n"
        "See configs/train_config.yaml for every key with a comment.\n\n"
        f"Flags (aliases of config keys):\n{flags}\n"
    )


if __name__ == "__main__":
    sys.exit(check_args(sys.argv[1:]))
