"""Training configuration: nested dataclasses, YAML files, dotted command-line overrides.

A run is described by one `TrainConfig` with the sections `model` (`PolicyConfig`), `data`
(`DataConfig`), `training`, `checkpoint`, `logging` and `wandb`. It is read from a YAML file and
then overridden from the command line, either with dotted keys (`--training.learning_rate 1e-4`)
or with the familiar diffusers-style flags, which are aliases of those keys (`--learning_rate 1e-4`).
Every value is checked against its field's type; an unknown key or flag fails with the closest valid
name. The resolved config is saved with every checkpoint and sent to the tracker.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from atlas_vla.data.libero import DataConfig
from atlas_vla.models.policy import PolicyConfig

REPORT_TO = ("wandb", "tensorboard", "all", "none")


@dataclass
class TrainingConfig:
    """Optimisation and the training loop."""

    output_dir: str = "outputs/atlas"  # checkpoints, the exported policy, W&B files and logs go here
    init_from: str | None = None  # fine-tune: start from the trainable weights of a saved policy (folder or Hub id)
    seed: int = 0
    train_batch_size: int = 32  # micro-batch per process; global batch = this x processes x accumulation
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None  # optimizer updates; null = num_train_epochs full epochs
    num_train_epochs: int = 10
    learning_rate: float = 1e-4
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
    cache_frozen_features: bool = False  # run the frozen VGGT once per training sample and train on its stored
    # outputs (no backbone in the step; memory: samples x layers x views x tokens x 2*embed_dim x 2 bytes)
    cached_copies: int = 1  # with data.random_shift: differently shifted copies cached per sample, one drawn per use
    validation_steps: int = 500  # run validation every N optimizer updates (and at the end)
    num_validation_batches: int | None = 20  # batches per validation; null = the whole validation split
    report_to: Literal["wandb", "tensorboard", "all", "none"] | None = None  # null = W&B if wandb.enabled
    push_to_hub: bool = False  # upload the final policy (needs `huggingface-cli login` or HF_TOKEN)
    hub_model_id: str | None = None  # Hub repo for push_to_hub; null = the output folder's name

    def __post_init__(self) -> None:
        positive = ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "validation_steps",
                    "cached_copies")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"training.max_train_steps must be >= 1 or null, got {self.max_train_steps}")
        if self.lr_warmup_steps < 0 or self.learning_rate <= 0:
            raise ValueError(f"training.learning_rate ({self.learning_rate}) must be > 0 and lr_warmup_steps "
                             f"({self.lr_warmup_steps}) >= 0")
        from transformers import SchedulerType

        names = [s.value for s in SchedulerType]
        if self.lr_scheduler not in names:
            raise ValueError(f"training.lr_scheduler {self.lr_scheduler!r} is not a transformers scheduler; "
                             f"expected one of {names}{_suggest(self.lr_scheduler, names)}")


@dataclass
class CheckpointConfig:
    """Where and how often training state is saved, and where to resume from."""

    checkpointing_steps: int = 1000  # save output_dir/checkpoints/checkpoint-{step} every N optimizer updates
    checkpoints_total_limit: int | None = 3  # keep the newest N checkpoints; null = keep all
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest" in output_dir/checkpoints

    def __post_init__(self) -> None:
        if self.checkpointing_steps < 1:
            raise ValueError(f"checkpoint.checkpointing_steps must be >= 1, got {self.checkpointing_steps}")
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
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    save_code: bool = True  # upload the training code with the run
    resume: Literal["allow", "must", "never", "auto"] = "allow"  # how a resumed job re-attaches to its run
    disable_stats: bool = False  # turn off system metrics (GPU/CPU utilisation and memory)


@dataclass
class EvalConfig:
    """Closed-loop LIBERO evaluation during training (the [sim] extra), off by default.

    It runs on the main process while the other ranks wait at a barrier (the process-group timeout
    is raised to 2 h for that); for long evaluations run `atlas-vla eval-libero` on the saved
    checkpoints from a separate job instead.
    """

    libero_steps: int | None = None  # evaluate every N optimizer updates; null = never
    suite: Literal["libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"] = "libero_spatial"
    tasks: list[int] | None = None  # null = every task of the suite
    initial_states: list[int] = field(default_factory=lambda: list(range(5)))  # official initial states per task
    max_steps: int | None = None  # null = the suite's protocol value
    replan_steps: int | None = None  # actions executed per query; null = the whole chunk
    temporal_ensemble: float | None = None  # query every step, average overlapping chunks (ACT decay, e.g. 0.1)
    camera_size: int = 256
    num_workers: int = 2  # simulator worker processes
    videos: bool = True  # write an mp4 per episode and log them to W&B

    def __post_init__(self) -> None:
        if self.libero_steps is not None and self.libero_steps < 1:
            raise ValueError(f"eval.libero_steps must be >= 1 or null, got {self.libero_steps}")
        if self.temporal_ensemble is not None and self.temporal_ensemble < 0:
            raise ValueError(f"eval.temporal_ensemble must be >= 0 or null, got {self.temporal_ensemble}")


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
        if self.training.cache_frozen_features and (self.data.streaming or not self.model.freeze_vggt):
            raise ValueError(f"training.cache_frozen_features: true needs data.streaming: false (got "
                             f"{self.data.streaming}) and model.freeze_vggt: true (got {self.model.freeze_vggt})")
        if self.training.cached_copies > 1 and not (self.training.cache_frozen_features and self.data.random_shift):
            raise ValueError(f"training.cached_copies: {self.training.cached_copies} stores differently shifted copies "
                             f"of each sample: it needs training.cache_frozen_features: true (got "
                             f"{self.training.cache_frozen_features}) and data.random_shift > 0 (got "
                             f"{self.data.random_shift}); otherwise every copy is the same")

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
    "validation_steps": "training.validation_steps",
    "report_to": "training.report_to",
    "push_to_hub": "training.push_to_hub",
    "hub_model_id": "training.hub_model_id",
    "checkpointing_steps": "checkpoint.checkpointing_steps",
    "checkpoints_total_limit": "checkpoint.checkpoints_total_limit",
    "resume_from_checkpoint": "checkpoint.resume_from_checkpoint",
    "log": "logging.log_file",
    "tracker_project_name": "wandb.project",
    "wandb": "wandb.enabled",
    "dataset": "data.source",
    "init_from": "training.init_from",
    "eval_libero_steps": "eval.libero_steps",
}


# ----------------------------------------------------------------------------------------------
# dicts <-> dataclasses
# ----------------------------------------------------------------------------------------------


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation, converting strings/ints the way YAML users expect."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (list, Sequence) or annotation is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{where} must be an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, values: Mapping[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a (nested) mapping, checking every key and value type."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown key {where}.{key}{_suggest(key, known)}; valid keys: {known}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a dataclass config (for YAML/JSON and the tracker)."""
    return dataclasses.asdict(config)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists become strings, so every tracker can show them)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        nested = next((a for a in (annotation, *typing.get_args(annotation)) if dataclasses.is_dataclass(a)), None)
        keys.append(prefix + f.name)
        if nested is not None:
            keys.extend(_all_keys(nested, f"{prefix}{f.name}."))
    return keys


# ----------------------------------------------------------------------------------------------
# files and command line
# ----------------------------------------------------------------------------------------------


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into a dict (empty file -> {})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of sections (model, data, training, ...), got {type(values).__name__}")
    return values


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    keys = _all_keys(TrainConfig)
    if dotted not in keys:
        names = keys + [f"--{alias}" for alias in FLAG_ALIASES]
        raise ValueError(f"unknown option --{dotted}{_suggest(dotted, names)}")
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
            parsed = yaml.safe_load(value) if value else value
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, str):
            parsed = value  # keep strings exactly as typed
        _set_dotted(overrides, FLAG_ALIASES.get(key, key), parsed)
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
    """A `TrainConfig` from a YAML file (or the defaults) plus overrides, validated."""
    values = load_yaml(path) if path is not None else {}
    values = merge(values, overrides or {})
    try:
        return from_dict(TrainConfig, values, "config")
    except ValueError as error:
        if path is None:
            raise
        raise ValueError(f"{path}: {error}") from None


def config_from_args(argv: Sequence[str]) -> TrainConfig:
    """The command-line entry: `--config FILE` plus overrides."""
    path, overrides = parse_overrides(argv)
    return load_config(path, overrides)


def save_config(config: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        yaml.safe_dump(to_dict(config), handle, sort_keys=False)
    os.replace(handle.name, path)
    return path


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
