"""Configuration: YAML + dotted overrides + diffusers flags, validation with suggestions, every shipped YAML."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from atlas_vla.config import (
    FLAG_ALIASES,
    CheckpointConfig,
    LoggingConfig,
    TrainConfig,
    TrainingConfig,
    check_args,
    config_from_args,
    config_yaml,
    is_train_option,
    load_config,
    load_yaml,
    parse_overrides,
    save_config,
    set_dotted,
    to_dict,
    usage,
)
from atlas_vla.data.config import DataConfig, check_sources_exist
from atlas_vla.models.config import PolicyConfig
from atlas_vla.schema import RenamedWarning

REPO = Path(__file__).resolve().parents[1]


def test_flags_and_dotted_keys_are_the_same_thing():
    a = config_from_args(["--learning_rate", "1e-4", "--mixed_precision=bf16", "--allow_tf32", "--wandb"])
    b = config_from_args(["--training.learning_rate=0.0001", "--training.mixed_precision", "bf16",
                          "--training.allow_tf32", "true", "--wandb.enabled", "true"])
    assert a == b
    assert a.training.learning_rate == 1e-4 and a.training.allow_tf32 and a.trackers == ["wandb"]


def test_value_parsing():
    c = config_from_args(["--model.vggt_layers", "[4, 11]", "--max_train_steps", "null", "--wandb.tags", "[a, b]",
                          "--model.vggt.dino.depth", "3", "--resume_from_checkpoint", "latest"])
    assert c.model.vggt_layers == [4, 11] and c.training.max_train_steps is None
    assert c.wandb.tags == ["a", "b"] and c.model.vggt.dino.depth == 3
    assert c.checkpoint.resume_from_checkpoint == "latest"


@pytest.mark.parametrize("argv,message", [
    (["--learning_rat", "1"], "did you mean '--learning_rate'"),
    (["--training.lerning_rate", "1"], "did you mean 'training.learning_rate'"),
    (["--training.seed", "abc"], "training.seed must be an integer, got 'abc'"),
    (["--mixed_precision", "fp8"], "must be one of ['no', 'fp16', 'bf16']"),
    (["--lr_scheduler", "cosin"], "did you mean 'cosine'"),
    (["--report_to", "mlflow"], "must be one of"),
    (["--model.image_size", "50"], "multiple of the VGGT patch size"),
    (["--data.val_fraction", "1.5"], "val_fraction must be in [0, 1)"),
    (["positional"], "unexpected argument 'positional'"),
])
def test_errors_name_the_key_and_suggest(argv, message):
    with pytest.raises(ValueError) as error:
        config_from_args(argv)
    assert message in str(error.value)


def test_unknown_yaml_key_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learnig_rate: 1.0\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown key config.training.learnig_rate \(did you mean 'learning_rate'"):
        load_config(path)


def test_report_to_resolution():
    assert config_from_args([]).trackers == []
    assert config_from_args(["--wandb"]).trackers == ["wandb"]
    assert config_from_args(["--wandb", "--report_to", "none"]).trackers == []
    assert config_from_args(["--report_to", "all"]).trackers == ["wandb", "tensorboard"]
    assert config_from_args(["--report_to", "tensorboard"]).trackers == ["tensorboard"]


def test_round_trip_and_no_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-123")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_456")
    config = config_from_args(["--config", str(REPO / "configs" / "demo.yaml"), "--seed", "7"])
    path = save_config(config, tmp_path / "out" / "config.yaml")
    text = path.read_text()
    assert "secret-key-123" not in text and "hf_secret_456" not in text
    assert load_config(path) == config
    assert parse_overrides(["--config", "x.yaml", "--seed", "1"]) == ("x.yaml", {"training": {"seed": 1}})


def test_every_alias_points_at_a_real_key():
    for alias, key in FLAG_ALIASES.items():
        section, _, name = key.partition(".")
        assert name in to_dict(TrainConfig())[section], alias


TRAINING_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("sweep"))


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):  # the sweep definitions are checked in tests/test_sweep.py
    assert isinstance(load_config(path), TrainConfig)


@pytest.mark.parametrize("path", sorted((REPO / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_is_valid(path):
    config = load_config_from_file(str(path))
    expected = yaml.safe_load(path.read_text())
    assert config.num_processes == expected["num_processes"]
    assert str(config.distributed_type).split(".")[-1] == expected["distributed_type"]


def test_deepspeed_launch_leaves_gradient_accumulation_to_train_py(monkeypatch):
    """`accelerate launch` exports a config file's `gradient_accumulation_steps` as
    ACCELERATE_GRADIENT_ACCUMULATION_STEPS, which Accelerator prefers over the value train.py passes;
    without the key DeepSpeed's value is "auto" and Accelerate fills it from train.py's flag."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    path = REPO / "accelerate_configs" / "deepspeed_zero2.yaml"
    argv = ["--config_file", str(path), "train.py", "--gradient_accumulation_steps", "4"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command sets it
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env
    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", raising=False)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    assert DeepSpeedPlugin().deepspeed_config["gradient_accumulation_steps"] == "auto"


def test_reading_a_config_imports_neither_torch_nor_datasets():
    import subprocess
    import sys

    code = ("import sys; from atlas_vla.config import load_config; load_config('configs/train_config.yaml'); "
            "print(sorted(m for m in ('torch', 'datasets', 'pyarrow', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_renamed_keys_keep_working_with_a_deprecation_warning(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("training: {validation_steps: 7}\ncheckpoint: {checkpointing_steps: 9}\n"
                    "eval: {libero_steps: 3, max_steps: 40, temporal_ensemble: 0.1}\n"
                    "model: {head: {pose_loss: l2, gripper_loss: l1}}\n")
    with pytest.warns(FutureWarning, match="config.eval.temporal_ensemble is deprecated: use config.eval.ensemble_decay"):
        old = load_config(path)
    assert (old.training.validate_every_steps, old.checkpoint.save_every_steps) == (7, 9)
    assert (old.eval.every_steps, old.eval.max_episode_steps, old.eval.ensemble_decay) == (3, 40, 0.1)
    assert (old.model.head.pose_loss_type, old.model.head.gripper_loss_type) == ("l2", "l1")
    with pytest.warns(FutureWarning, match="--eval.libero_steps is deprecated: use --eval.every_steps"):
        assert config_from_args(["--eval.libero_steps", "5"]).eval.every_steps == 5
    # the diffusers-style flags are aliases of the new keys, not deprecated
    assert config_from_args(["--validation_steps", "4", "--checkpointing_steps", "6", "--eval_libero_steps", "2"]) \
        == config_from_args(["--training.validate_every_steps", "4", "--checkpoint.save_every_steps", "6",
                             "--eval.every_steps", "2"])


def test_every_accepted_lr_scheduler_is_a_transformers_scheduler():
    from transformers import SchedulerType

    from atlas_vla.config import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}


def test_no_off_and_yes_stay_the_strings_typed_in_flags_and_files(tmp_path):
    """YAML 1.1 would read `no` as False: `--mixed_precision no` (Accelerate's spelling) must mean "no"."""
    assert load_config(Path(__file__).parents[1] / "configs" / "demo.yaml", parse_overrides(["--mixed_precision", "no"])[1]).training.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  mixed_precision: no\n  allow_tf32: false\n")
    config = load_config(path)
    assert config.training.mixed_precision == "no" and config.training.allow_tf32 is False


def test_paths_are_read_against_the_working_directory_and_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    config = config_from_args(["--config", str(REPO / "configs" / "demo.yaml"), "--data.source", "data",
                               "--output_dir", "runs/a", "--log", "logs/train.log", "--init_from", "~/policy",
                               "--training.feature_store", "stores/s", "--resume_from_checkpoint", "runs/a/ckpt",
                               "--data.norm_stats", "stats.json"])
    assert config.data.source == str(tmp_path / "data")
    assert config.training.output_dir == str(tmp_path / "runs" / "a")
    assert config.logging.log_file == str(tmp_path / "logs" / "train.log")
    assert config.training.init_from == str(Path.home() / "policy")
    assert config.training.feature_store == str(tmp_path / "stores" / "s")
    assert config.checkpoint.resume_from_checkpoint == str(tmp_path / "runs" / "a" / "ckpt")
    assert config.data.norm_stats == str(tmp_path / "stats.json")
    # what config.yaml records, read again from anywhere, means the same
    saved = save_config(config, tmp_path / "config.yaml")
    monkeypatch.chdir(REPO)
    assert load_config(saved) == config
    # names that are not local paths stay as they are: Hub ids, the packaged MiniLM, `latest` and `auto`
    other = config_from_args(["--config", str(REPO / "configs" / "train_config.yaml"), "--data.source",
                              "[physical-intelligence/libero, data/not_here]", "--resume_from_checkpoint", "latest",
                              "--training.feature_store", "auto", "--model.language.model_name_or_path", "minilm"])
    assert other.data.source == ["physical-intelligence/libero", "data/not_here"]  # owner/name: asked of the Hub
    assert other.model.vggt_pretrained == "facebook/VGGT-1B" and other.model.language.model_name_or_path == "minilm"
    assert (other.checkpoint.resume_from_checkpoint, other.training.feature_store) == ("latest", "auto")


def test_a_source_named_on_the_command_line_is_never_replaced_by_synthetic_data(tmp_path):
    demo = str(REPO / "configs" / "demo.yaml")
    assert load_config(demo).data.generate_synthetic  # the demo config's own folder: written on first use
    named = config_from_args(["--config", demo, "--data.source", str(tmp_path / "mine")])
    assert named.data.generate_synthetic is False
    assert config_from_args(["--config", demo, "--dataset", str(tmp_path / "mine")]).data.generate_synthetic is False
    asked = config_from_args(["--config", demo, "--data.source", str(tmp_path / "mine"),
                              "--data.generate_synthetic", "true"])
    assert asked.data.generate_synthetic is True  # said in so many words
    with pytest.raises(FileNotFoundError, match=f"data source {tmp_path / 'mine'} does not exist"):
        check_sources_exist(named.data)
    check_sources_exist(asked.data)  # the run will write it



# ----------------------------------------------------------------------------------------------
# each section's own checks: the boundary on both sides, the whole message
# ----------------------------------------------------------------------------------------------


def value_error(make) -> str:
    with pytest.raises(ValueError) as error:
        make()
    return str(error.value)


@pytest.mark.parametrize("name", ["train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                                  "validate_every_steps", "cached_copies"])
def test_training_counts_must_be_at_least_one(name):
    assert getattr(TrainingConfig(**{name: 1}), name) == 1
    assert value_error(lambda: TrainingConfig(**{name: 0})) == f"training.{name} must be >= 1, got 0"
    assert value_error(lambda: TrainingConfig(**{name: -3})) == f"training.{name} must be >= 1, got -3"


@pytest.mark.parametrize("name", ["max_train_steps", "num_validation_batches"])
def test_optional_counts_are_at_least_one_or_null(name):
    assert getattr(TrainingConfig(**{name: 1}), name) == 1
    assert getattr(TrainingConfig(**{name: None}), name) is None
    assert value_error(lambda: TrainingConfig(**{name: 0})) == f"training.{name} must be >= 1 or null, got 0"


def test_learning_rate_is_positive_and_warmup_not_negative():
    assert TrainingConfig(lr_warmup_steps=0, learning_rate=1e-12).lr_warmup_steps == 0
    assert value_error(lambda: TrainingConfig(learning_rate=0.0)) == \
        "training.learning_rate (0.0) must be > 0 and lr_warmup_steps (500) >= 0"
    assert value_error(lambda: TrainingConfig(learning_rate=-1e-4)) == \
        "training.learning_rate (-0.0001) must be > 0 and lr_warmup_steps (500) >= 0"
    assert value_error(lambda: TrainingConfig(lr_warmup_steps=-1)) == \
        "training.learning_rate (0.0001) must be > 0 and lr_warmup_steps (-1) >= 0"


def test_feature_store_is_a_folder_auto_or_null():
    assert TrainingConfig(feature_store="stores/s").feature_store == "stores/s"
    assert value_error(lambda: TrainingConfig(feature_store="")) == \
        "training.feature_store must be a folder, auto or null, got ''"
    assert value_error(lambda: TrainingConfig(feature_store=5)) == \
        "training.feature_store must be a folder, auto or null, got 5"


def test_cache_frozen_features_means_feature_store_auto_with_a_warning():
    with pytest.warns(RenamedWarning) as caught:
        config = TrainingConfig(cache_frozen_features=True)
    assert [str(w.message) for w in caught] == [
        "training.cache_frozen_features: true is deprecated: use training.feature_store: auto"]
    assert (config.feature_store, config.cache_frozen_features) == ("auto", False)
    with pytest.warns(RenamedWarning):
        config = TrainingConfig(cache_frozen_features=True, feature_store="mine")
    assert (config.feature_store, config.cache_frozen_features) == ("mine", False)  # a named store is kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TrainingConfig().feature_store is None


def test_checkpoint_and_logging_intervals():
    assert CheckpointConfig(save_every_steps=1, checkpoints_total_limit=1).checkpoints_total_limit == 1
    assert CheckpointConfig(checkpoints_total_limit=None).checkpoints_total_limit is None
    assert value_error(lambda: CheckpointConfig(save_every_steps=0)) == \
        "checkpoint.save_every_steps must be >= 1, got 0"
    assert value_error(lambda: CheckpointConfig(checkpoints_total_limit=0)) == \
        "checkpoint.checkpoints_total_limit must be >= 1 or null, got 0"
    assert LoggingConfig(log_every_steps=1).log_every_steps == 1
    assert value_error(lambda: LoggingConfig(log_every_steps=0)) == "logging.log_every_steps must be >= 1, got 0"


def test_a_feature_store_needs_indexed_data_and_a_frozen_backbone():
    auto = TrainingConfig(feature_store="auto")
    assert TrainConfig(training=auto).training.feature_store == "auto"
    assert value_error(lambda: TrainConfig(training=auto, data=DataConfig(streaming=True))) == (
        "training.feature_store: auto needs data.streaming: false (got True) and model.freeze_vggt: true (got True)")
    assert value_error(lambda: TrainConfig(training=auto, model=PolicyConfig(freeze_vggt=False))) == (
        "training.feature_store: auto needs data.streaming: false (got False) and model.freeze_vggt: true (got False)")


def test_cached_copies_need_a_feature_store_and_random_shift():
    two = TrainingConfig(cached_copies=2, feature_store="auto")
    assert TrainConfig(training=two, data=DataConfig(random_shift=4)).training.cached_copies == 2
    assert TrainConfig(training=TrainingConfig(cached_copies=1)).training.cached_copies == 1
    assert value_error(lambda: TrainConfig(training=two)) == (
        "training.cached_copies: 2 stores differently shifted copies of each sample: it needs training.feature_store "
        "(got auto) and data.random_shift > 0 (got 0); otherwise every copy is the same")
    assert value_error(lambda: TrainConfig(training=TrainingConfig(cached_copies=2),
                                           data=DataConfig(random_shift=4))) == (
        "training.cached_copies: 2 stores differently shifted copies of each sample: it needs training.feature_store "
        "(got None) and data.random_shift > 0 (got 4); otherwise every copy is the same")


# ----------------------------------------------------------------------------------------------
# files, flags, the help text and the launcher's check
# ----------------------------------------------------------------------------------------------


def test_load_yaml_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(FileNotFoundError) as not_found:
        load_yaml(missing)
    assert str(not_found.value) == f"config file not found: {missing}"
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [1, 2\n")
    with pytest.raises(ValueError) as invalid:
        load_yaml(broken)
    assert isinstance(invalid.value.__cause__, yaml.YAMLError)
    assert str(invalid.value) == f"{broken}: not valid YAML: {invalid.value.__cause__}"
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- data\n")
    with pytest.raises(ValueError) as not_mapping:
        load_yaml(listed)
    assert str(not_mapping.value) == f"{listed}: expected a mapping of sections (model, data, training, ...), got list"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}


def test_parse_overrides_edge_cases():
    with pytest.raises(ValueError) as error:
        parse_overrides(["--"])
    assert str(error.value) == "unexpected argument '--'; options look like --training.learning_rate 1e-4"
    assert parse_overrides(["--wandb"]) == (None, {"wandb": {"enabled": True}})
    assert parse_overrides(["--hub_model_id="]) == (None, {"training": {"hub_model_id": ""}})  # empty, not null
    assert parse_overrides(["--output_dir", "a: b: c"]) == (None, {"training": {"output_dir": "a: b: c"}})  # not YAML
    assert parse_overrides(["--config=c.yaml", "--allow_tf32", "--seed", "3"]) == \
        ("c.yaml", {"training": {"allow_tf32": True, "seed": 3}})


def test_set_dotted_refuses_a_value_where_a_section_belongs():
    with pytest.raises(ValueError) as error:
        set_dotted({"training": 5}, "training.seed", 1)
    assert str(error.value) == "cannot set --training.seed: training is not a section"


@pytest.mark.parametrize("flag,expected", [
    ("--config", True), ("--config=c.yaml", True), ("--seed", True), ("--seed=3", True), ("--seed=a=b", True),
    ("--training.seed", True), ("--training.seed=3", True), ("--training.validation_steps", True),
    ("--eval.libero_steps=2", True), ("--model.vggt.dino.depth", True), ("seed", True), ("training.seed", True),
    ("--training.seedx", False), ("--bogus", False), ("--seed3", False), ("-seed", False), ("--", False),
    ("--CONFIG", False),
])
def test_is_train_option(flag, expected):
    assert is_train_option(flag) is expected


def test_config_yaml_keeps_the_fields_in_their_declared_order():
    text = config_yaml(TrainConfig())
    values = yaml.safe_load(text)
    assert list(values) == ["model", "data", "training", "checkpoint", "logging", "wandb", "eval"]
    assert list(values["training"])[:4] == ["output_dir", "init_from", "seed", "train_batch_size"]
    assert list(values["checkpoint"]) == ["save_every_steps", "checkpoints_total_limit", "resume_from_checkpoint"]
    assert values == to_dict(TrainConfig())


def test_usage_lists_the_sections_and_every_flag():
    text = usage()
    header, flags = text.split("Flags (aliases of config keys):\n")
    assert header == (
        "usage: train.py [--config FILE] [--section.key VALUE ...] [--flag VALUE ...]\n\n"
        "Config sections (YAML keys, settable as --section.key): model, data, training, checkpoint, logging, wandb, "
        "eval.\n"
        "See configs/train_config.yaml for every key with a comment.\n\n")
    lines = flags.split("\n")
    assert lines[-1] == "" and len(lines) == len(FLAG_ALIASES) + 1
    assert lines[0] == "  --output_dir                   = --training.output_dir"
    assert lines[3] == "  --gradient_accumulation_steps  = --training.gradient_accumulation_steps"
    assert lines[-2] == "  --eval_libero_steps            = --eval.every_steps"
    assert [re.fullmatch(r"  --(\S+) += --(\S+)", line).groups() for line in lines[:-1]] == list(FLAG_ALIASES.items())
    assert {line.index("=") for line in lines[:-1]} == {33}


def test_check_args_prints_one_error_line_and_returns_2(tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_args(["--training.validation_steps", "5", "--seed", "1"]) == 0
    assert caught == []  # deprecations are the trainer's to print
    assert capsys.readouterr() == ("", "")
    assert check_args(["--training.seed", "x"]) == 2
    assert capsys.readouterr() == ("", "train.py: error: config.training.seed must be an integer, got 'x'\n")
    missing = tmp_path / "qqq"
    assert check_args(["--data.source", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"train.py: error: data source {missing} does not exist: ")
    assert err.count("\n") == 1


def test_every_local_path_of_the_config_is_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "lm").mkdir()
    monkeypatch.chdir(tmp_path)
    config = config_from_args(["--config", str(REPO / "configs" / "demo.yaml"), "--data.cache_dir", "cache",
                               "--model.vggt_pretrained", "weights/vggt.safetensors",
                               "--model.language.model_name_or_path", "lm"])
    assert config.data.cache_dir == str(tmp_path / "cache")
    assert config.model.vggt_pretrained == str(tmp_path / "weights" / "vggt.safetensors")
    assert config.model.language.model_name_or_path == str(tmp_path / "lm")
    assert config_from_args(["--config", str(REPO / "configs" / "demo.yaml")]).data.cache_dir is None
