"""AdamW's parameter groups (`training.optimization`): the locating parameters' own learning rate and schedule."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from accelerate import Accelerator
from helpers import synthetic_dataset, tiny_args, tiny_policy_config

from atlas_vla.config import TrainConfig, TrainingConfig
from atlas_vla.constants import OBJECT_POSITIONS
from atlas_vla.data.normalization import compute_norm_stats
from atlas_vla.data.samples import LiberoSamples
from atlas_vla.data.sources import load_libero
from atlas_vla.models.policy import AtlasPolicy
from atlas_vla.training.optimization import Prepared, keep_configured_settings, prepare_optimization
from atlas_vla.training.train import main as train_main


def prepared_policy(tmp_path, **training: object) -> tuple[AtlasPolicy, Prepared]:
    """A tiny policy with a spatial read-out and a pixel stem, prepared for training by a real `Accelerator`."""
    data = load_libero(str(synthetic_dataset(tmp_path)))
    torch.manual_seed(0)
    policy = AtlasPolicy(tiny_policy_config(locate_weight=1.0, locate_readout="spatial", pixel_stem=True),
                         compute_norm_stats(data))
    training_cfg = TrainingConfig(weight_decay=0.0, train_batch_size=4, dataloader_num_workers=0, **training)
    return policy, prepare_optimization(Accelerator(cpu=True), policy, LiberoSamples(data, policy.config.sample_spec),
                                        None, training_cfg, policy.backbone_references(), None)


def first_update(tmp_path, locate_learning_rate: float | None) -> dict[str, float]:
    """How far AdamW's first update moves the locating parameters and the rest, at most (an update of Adam's first
    step is the learning rate wherever the gradient is not zero)."""
    policy, prepared = prepared_policy(tmp_path, learning_rate=1e-4, locate_learning_rate=locate_learning_rate,
                                       lr_scheduler="constant", lr_warmup_steps=0, max_train_steps=1)
    locating = {id(p) for p in policy.locating_parameters()}
    before = {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}
    batch = next(iter(prepared.train_loader))
    batch[OBJECT_POSITIONS] = torch.linspace(-0.3, 0.9, 24).reshape(4, 6)
    prepared.policy(batch)["loss"].backward()
    prepared.optimizer.step()
    moved = {"locating": 0.0, "rest": 0.0}
    for name, p in policy.named_parameters():
        if p.requires_grad:
            group = "locating" if id(p) in locating else "rest"
            moved[group] = max(moved[group], (p.detach() - before[name]).abs().max().item())
    return moved


def test_the_locate_read_out_and_the_pixel_stem_take_the_locate_learning_rate(tmp_path):
    """With `locate_learning_rate` the read-out's and the stem's parameters step at it and every other parameter at
    `learning_rate`; without it, all at `learning_rate`. Both kinds are in `locating_parameters`."""
    policy = AtlasPolicy(tiny_policy_config(locate_weight=1.0, locate_readout="spatial", pixel_stem=True),
                         compute_norm_stats(load_libero(str(synthetic_dataset(tmp_path)))))
    names = {id(p): name for name, p in policy.named_parameters()}
    prefixes = {names[id(p)].split(".")[0] for p in policy.locating_parameters()}
    assert prefixes == {"locator", "stem"}
    own = first_update(tmp_path, locate_learning_rate=1e-2)
    assert own["locating"] == pytest.approx(1e-2, rel=1e-3) and own["rest"] == pytest.approx(1e-4, rel=1e-3)
    shared = first_update(tmp_path, locate_learning_rate=None)
    assert shared["locating"] == pytest.approx(1e-4, rel=1e-3) and shared["rest"] == pytest.approx(1e-4, rel=1e-3)


def test_the_locating_parameters_follow_their_own_schedule(tmp_path):
    """With `locate_lr_scheduler`, the locating group's rate follows it (here: warm-up, then constant) while the rest
    follows `lr_scheduler` (warm-up, then a cosine decay to zero), update by update; a saved schedule resumes both."""
    _, prepared = prepared_policy(tmp_path, learning_rate=1e-4, locate_learning_rate=1e-3, lr_scheduler="cosine",
                                  locate_lr_scheduler="constant_with_warmup", lr_warmup_steps=2, max_train_steps=10)
    rates = []
    for _ in range(10):
        rates.append([group["lr"] for group in prepared.optimizer.param_groups])
        prepared.optimizer.step()
        prepared.scheduler.step()
    warm = [0.0, 0.5]
    cosine = [0.5 * (1 + math.cos(math.pi * (step - 2) / 8)) for step in range(2, 10)]
    assert [rest for rest, _ in rates] == pytest.approx([1e-4 * f for f in warm + cosine])
    assert [locating for _, locating in rates] == pytest.approx([1e-3 * f for f in warm + [1.0] * 8])
    _, resumed = prepared_policy(tmp_path, learning_rate=1e-4, locate_learning_rate=1e-3,
                                 lr_scheduler="cosine", locate_lr_scheduler="constant_with_warmup", lr_warmup_steps=2,
                                 max_train_steps=10)
    saved = prepared.scheduler.state_dict()
    saved["last_epoch"] = 6
    resumed.scheduler.load_state_dict(saved)
    resumed.optimizer.step()
    resumed.scheduler.step()
    assert [group["lr"] for group in resumed.optimizer.param_groups] == pytest.approx([1e-4 * cosine[5], 1e-3])


def test_a_run_logs_the_locating_groups_rate_beside_the_rest(tmp_path, capsys):
    """train.py takes both keys, and `metrics.jsonl` has the locating group's rate as `train/locate_lr` beside
    `train/lr`: here 2e-3 constant after a warm-up of 2 updates, while the rest (1e-3) decays to zero at update 6."""
    out = tmp_path / "run"
    assert train_main(tiny_args(synthetic_dataset(tmp_path), out, "--model.locate_weight", "1", "--learning_rate",
                                "1e-3", "--training.locate_learning_rate", "2e-3", "--training.locate_lr_scheduler",
                                "constant_with_warmup")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = {row["step"]: (row["train/lr"], row["train/locate_lr"]) for row in rows if "train/lr" in row}
    assert sorted(rates) == [1, 2, 3, 4, 5, 6]
    assert rates[1] == pytest.approx((0.5e-3, 1e-3)) and rates[2] == pytest.approx((1e-3, 2e-3))
    assert rates[6][0] == pytest.approx(0.0, abs=1e-9) and rates[6][1] == pytest.approx(2e-3)
    # resumed without them, the optimizer has one group where the checkpoint has two: the error names the keys
    assert train_main(tiny_args(synthetic_dataset(tmp_path), out, "--model.locate_weight", "1", "--learning_rate",
                                "1e-3", "--resume_from_checkpoint", "latest")) == 2
    assert re.search(r"cannot resume from .*checkpoint-6: it was saved with training.locate_learning_rate = 0.002 "
                     r"\(this config: None\), training.locate_lr_scheduler = 'constant_with_warmup' \(this config: "
                     r"None\); resume with the same settings", capsys.readouterr().err)


def test_a_restored_optimizer_takes_the_configs_rates_and_settings_before_its_next_update(tmp_path):
    """After a checkpoint's optimizer and schedule are loaded (here 6 updates of a 10-update run), each group's rate is
    the config's times the new schedule's factor at the update reached, before any further update, and every group
    holds the config's AdamW settings; each change is named once, and a second call finds none."""
    schedules = {"lr_scheduler": "cosine", "locate_lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 2}
    _, first = prepared_policy(tmp_path, learning_rate=1e-4, locate_learning_rate=1e-3, max_train_steps=10, **schedules)
    for _ in range(6):
        first.optimizer.step()
        first.scheduler.step()
    settings = {"learning_rate": 2e-4, "locate_learning_rate": 5e-4, "max_train_steps": 20, "adam_beta2": 0.99,
                "adam_epsilon": 1e-6, **schedules}
    _, resumed = prepared_policy(tmp_path, **settings)
    resumed.optimizer.load_state_dict(first.optimizer.state_dict())
    resumed.scheduler.load_state_dict(first.scheduler.state_dict())
    config = TrainingConfig(weight_decay=0.0, train_batch_size=4, dataloader_num_workers=0, **settings)
    assert keep_configured_settings(resumed.optimizer, resumed.scheduler, config) == [
        "training.learning_rate 0.0001 -> 0.0002", "training.adam_epsilon 1e-08 -> 1e-06",
        "training.adam_beta1, adam_beta2 (0.9, 0.95) -> (0.9, 0.99)", "training.locate_learning_rate 0.001 -> 0.0005"]
    cosine = 0.5 * (1 + math.cos(math.pi * (6 - 2) / 18))
    groups = resumed.optimizer.param_groups
    assert [group["lr"] for group in groups] == pytest.approx([2e-4 * cosine, 5e-4])
    assert all(group["betas"] == (0.9, 0.99) and group["eps"] == 1e-6 for group in groups)
    assert keep_configured_settings(resumed.optimizer, resumed.scheduler, config) == []
    assert [group["lr"] for group in groups] == pytest.approx([2e-4 * cosine, 5e-4])


def test_a_locate_learning_rate_without_anything_to_locate_is_refused():
    """A rate for parameters the model does not have is a mistake in the config, named with what would give them."""
    with pytest.raises(ValueError, match=r"training.locate_learning_rate: 0.001 sets the rate of the locate read-out "
                                         r"and the pixel stem, and this model has neither"):
        TrainConfig(training=TrainingConfig(locate_learning_rate=1e-3))
    with pytest.raises(ValueError, match=r"training.locate_learning_rate must be > 0 or null, got 0.0"):
        TrainingConfig(locate_learning_rate=0.0)
    with pytest.raises(ValueError, match=r"training.locate_lr_scheduler: constant sets the schedule of the locate "
                                         r"read-out and the pixel stem, and this model has neither"):
        TrainConfig(training=TrainingConfig(locate_lr_scheduler="constant"))
    with pytest.raises(ValueError, match=r"training.locate_lr_scheduler 'constnat' is not a transformers scheduler"):
        TrainingConfig(locate_lr_scheduler="constnat")


def test_a_schedule_that_follows_a_metric_is_refused_by_name():
    """The loop steps every schedule on the update count: one that sets the rate from a metric would fail at the
    first update, after the features were built."""
    for key, name in (("lr_scheduler", "reduce_lr_on_plateau"), ("locate_lr_scheduler", "reduce_lr_on_plateau"),
                      ("lr_scheduler", "greedy")):
        with pytest.raises(ValueError, match=rf"training.{key} '{name}' is not supported: it sets the rate from a "
                                             r"metric"):
            TrainingConfig(**{key: name})


def test_a_resume_with_another_rate_and_weight_decay_goes_on_with_them(tmp_path, capsys):
    """torch restores a checkpoint's rates and AdamW settings over the config's: a resume that changes them says so and
    runs with the config's, the schedule going on from where it stood. Here a 6-update run at 1e-3 (cosine, 2 updates
    of warm-up) resumed to 10 updates at 5e-4 logs 5e-4 times the 10-update cosine at updates 7-10."""
    out, data = tmp_path / "run", synthetic_dataset(tmp_path)
    assert train_main(tiny_args(data, out, "--learning_rate", "1e-3")) == 0
    assert train_main(tiny_args(data, out, "--learning_rate", "5e-4", "--training.weight_decay", "0.05",
                                "--max_train_steps", "10", "--resume_from_checkpoint", "latest")) == 0
    logged = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = {row["step"]: row["train/lr"] for row in rows if "train/lr" in row}
    cosine = {step: 0.5 * (1 + math.cos(math.pi * (step - 2) / 8)) for step in (7, 8, 9)}
    assert [rates[step] for step in (7, 8, 9)] == pytest.approx([5e-4 * cosine[step] for step in (7, 8, 9)])
    assert re.search(r"resuming from .*checkpoint-6 with settings other than its optimizer's: training.learning_rate "
                     r"0.001 -> 0.0005, training.weight_decay 0.01 -> 0.05", logged)
    saved = torch.load(out / "checkpoints" / "checkpoint-10" / "optimizer.bin", weights_only=True)
    assert [group["weight_decay"] for group in saved["param_groups"]] == [0.05]
