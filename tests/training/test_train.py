"""The training job end to end: real `accelerate launch` runs on CPU, W&B offline files read back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ACCELERATE_CPU_1, ACCELERATE_CPU_2, HAS_SIM, offline_environment, synthetic_dataset, tiny_args
from safetensors import safe_open
from safetensors.torch import load_file
from wandb_records import find_run_files, read_run

from atlas_vla.training.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
# (`train/locate_loss` and `val/locate_loss` are logged only where the data says where things are: not here)
MISSION_METRICS = ["train/loss", "train/pose_loss", "train/gripper_loss", "train/lr", "train/epoch", "train/step",
                   "val/loss", "val/pose_loss", "val/gripper_loss", "val/pose_l2_error", "val/pose_l1_error",
                   "val/gripper_error"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return synthetic_dataset(tmp_path_factory.mktemp("train-data"), num_episodes=8)


SENTINEL_KEY = "sentinel" + "0123456789abcdef" * 2  # a W&B API key's 40 characters, found nowhere else


def assert_same_scalars(history: dict[str, list[tuple[int, float]]], out: Path, rel: float = 1e-9) -> None:
    """A tracker's scalars equal `metrics.jsonl` at every step (same steps, same values), and all are finite."""
    local = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = {key for row in local for key in row if key != "step"}
    assert keys <= set(history)
    for key in sorted(keys):
        expected = [(row["step"], row[key]) for row in local if key in row]
        assert [step for step, _ in history[key]] == [step for step, _ in expected], key
        assert [value for _, value in history[key]] == pytest.approx([value for _, value in expected], rel=rel), key
        assert np.isfinite([value for _, value in expected]).all(), key


def run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=offline_environment(**env), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def accelerate(*args: str, **env: str) -> subprocess.CompletedProcess:
    return run([*ACCELERATE_CPU_1, *args], **env)


@pytest.mark.slow
def test_launch_logs_every_metric_config_tags_to_wandb(tmp_path, data_dir, observation_file):
    out = tmp_path / "run"
    result = accelerate(*tiny_args(data_dir, out, "--report_to", "wandb", "--wandb.tags", "[smoke, ci]",
                                   "--wandb.notes", "a smoke test", "--training.num_validation_batches", "2"),
                        WANDB_API_KEY=SENTINEL_KEY)
    [run_file] = find_run_files(out)
    logged = read_run(run_file)
    assert set(MISSION_METRICS) <= set(logged.history)
    assert_same_scalars(logged.history, out)
    assert [step for step, _ in logged.history["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in logged.history["val/pose_l1_error"]] == [3, 6]
    assert "val/baseline_pose_l1_error" in logged.history
    # a validation of 2 batches scores what eval-offline scores with that limit: samples spread over the whole split
    from atlas_vla.config import load_config
    from atlas_vla.eval.offline import evaluate_offline

    final = evaluate_offline(str(out / "final"), load_config(out / "config.yaml").data, batch_size=8, max_batches=2)
    assert logged.history["val/pose_l1_error"][-1][1] == pytest.approx(final["val/pose_l1_error"], rel=1e-5)
    assert logged.history["val/gripper_loss"][-1][1] == pytest.approx(final["val/gripper_loss"], rel=1e-5)
    assert logged.tags == ["smoke", "ci"] and logged.notes == "a smoke test"
    assert logged.run_id == (out / "wandb_run_id.txt").read_text().strip()
    assert logged.config["training.learning_rate"] == 1e-3
    assert logged.config["parameters.trainable"] < logged.config["parameters.total"]
    assert logged.config["setup.num_processes"] == 1 and logged.config["setup.global_batch_size"] == 8
    # the key wandb read from the environment reached no file of the run and no line of its output
    assert SENTINEL_KEY not in result.stdout + result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert SENTINEL_KEY.encode() not in path.read_bytes(), path
    # checkpoints: safetensors only, no frozen backbone or text-encoder tensors, retention
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["checkpoint-4", "checkpoint-6"]
    for folder in (checkpoints[-1], checkpoints[-1] / "policy", out / "final"):
        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            assert all(k.startswith(("fusion.", "head.")) for k in handle.keys())
    assert not list(out.rglob("*.bin")) or all(p.name in ("optimizer.bin", "scheduler.bin", "sampler.bin")
                                              for p in out.rglob("*.bin"))
    result = run([sys.executable, "-m", "atlas_vla.cli", "predict", "--checkpoint", str(out / "final"),
                  "--observation", str(observation_file), "--json"])
    from atlas_vla.models.policy import AtlasPolicy

    observation = dict(np.load(observation_file))
    observation["task_description"] = str(observation["task_description"])
    expected = AtlasPolicy.from_pretrained(out / "final").predict_action(observation)
    np.testing.assert_array_equal(np.asarray(json.loads(result.stdout)["actions"]), expected)


def train_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def largest_weight_gap(a: Path, b: Path) -> float:
    """The largest difference between two runs' trained weights."""
    first, second = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert first.keys() == second.keys()
    return max(float((first[key] - second[key]).abs().max()) for key in first)


@pytest.mark.slow
def test_two_cpu_processes_train_as_one_process_with_their_global_batch(tmp_path, data_dir, finished_run):
    out, log = tmp_path / "ddp", tmp_path / "logs" / "train.log"
    result = run(["./launch.sh", "--mode", "cpu", "--gpus", "2", "--wandb", "--log", str(log), "--",
                  *tiny_args(data_dir, out)])
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2" in result.stdout
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_batch_size"] == 2 * 8
    first, second = summary["rank_weight_checksums"]
    assert first == second
    # Two processes of 8 are one process of 16: the same samples per update, each valid action step weighed
    # the same. Measured: 1.3e-5 apart (float reduction order). Had both ranks trained on the same 8 samples,
    # the run would equal the one-process run of 8 (`finished_run`), 4.7e-3 away.
    one = tmp_path / "one-process"
    assert train_main(tiny_args(data_dir, one, "--train_batch_size", "16")) == 0
    assert largest_weight_gap(out, one) < 1e-4
    assert largest_weight_gap(out, finished_run) > 1e-3
    assert train_losses(out) == pytest.approx(train_losses(one), rel=1e-5)
    assert train_losses(out) != pytest.approx(train_losses(finished_run), rel=1e-2)
    [run_file] = find_run_files(out)  # one W&B run for the whole job
    lr = dict(read_run(run_file).history["train/lr"])
    # warm-up of 2 updates then cosine to 0 at update 6, despite the scheduler stepping on 2 processes
    assert lr[1] == pytest.approx(0.5e-3) and lr[2] == pytest.approx(1e-3) and lr[6] == pytest.approx(0.0, abs=1e-9)
    assert "exported the policy" in log.read_text()


def scenes_dataset(root: Path, count: int = 24) -> Path:
    """`count` one-frame scenes in the synthetic data's frame (64 px, 20 fps): no action, known positions."""
    from atlas_vla.data.lerobot_writer import LeRobotV2Writer

    rng = np.random.default_rng(5)
    writer = LeRobotV2Writer(root / "scenes", fps=20)
    for _ in range(count):
        writer.add_episode(rng.integers(0, 255, (1, 64, 64, 3), np.uint8), rng.integers(0, 255, (1, 64, 64, 3), np.uint8),
                           rng.normal(0, 0.1, (1, 8)).astype(np.float32), np.full((1, 7), np.nan, np.float32),
                           "pick up the red block", object_positions=rng.uniform(0, 1, (1, 6)).astype(np.float32))
    return writer.close()


@pytest.mark.slow
def test_two_processes_weigh_the_locate_loss_by_known_positions_as_one_process_does(tmp_path, data_dir):
    """With scenes (no action, positions known) beside demonstrations, each process's micro-batch holds its own mix:
    its action losses are shared out by its action steps and its locate loss by its known coordinates, so two
    processes of 8 still train as one process of 16."""
    scenes = scenes_dataset(tmp_path)
    extra = ("--data.source", f"[{data_dir}, {scenes}]", "--model.locate_weight", "1",
             "--validation_steps", "100", "--checkpointing_steps", "100")
    two, one = tmp_path / "two", tmp_path / "one"
    run([*ACCELERATE_CPU_2, *tiny_args(data_dir, two, *extra)])
    assert train_main(tiny_args(data_dir, one, "--train_batch_size", "16", *extra)) == 0
    assert largest_weight_gap(two, one) < 1e-4
    assert train_losses(two) == pytest.approx(train_losses(one), rel=1e-5)


@pytest.mark.slow
def test_resume_continues_exactly_and_in_the_same_wandb_run(tmp_path, data_dir):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run([sys.executable, "train.py", *tiny_args(data_dir, straight)])
    run([sys.executable, "train.py", *tiny_args(data_dir, resumed, "--report_to", "wandb")])
    # simulate a crash right after the checkpoint of step 4
    import shutil

    shutil.rmtree(resumed / "checkpoints" / "checkpoint-6")
    shutil.rmtree(resumed / "final")
    run([sys.executable, "train.py", *tiny_args(data_dir, resumed, "--report_to", "wandb",
                                                 "--resume_from_checkpoint", "latest")])
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(resumed / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key
    runs = [read_run(f) for f in find_run_files(resumed)]
    assert len(runs) == 2 and runs[0].run_id == runs[1].run_id
    steps = sorted([step for step, _ in r.history["train/loss"]] for r in runs)
    assert steps == [[1, 2, 3, 4, 5, 6], [5, 6]]  # the resumed job continues the step axis after 4
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_bad_inputs_fail_clearly_and_keep_saved_work(tmp_path, data_dir, capsys):
    assert train_main(tiny_args(data_dir, tmp_path / "a", "--training.learning_rat", "1")) == 2
    assert "did you mean" in capsys.readouterr().err
    assert train_main(["--config", "configs/demo.yaml", "--training.lerning_rate", "1"]) == 2
    assert "did you mean 'training.learning_rate'" in capsys.readouterr().err
    assert train_main(["--config", "configs/demo.yaml", "--mixed_precision", "fp8"]) == 2
    assert "training.mixed_precision must be one of" in capsys.readouterr().err
    assert train_main(tiny_args(data_dir, tmp_path / "fp16", "--mixed_precision", "fp16")) == 2
    assert "training.mixed_precision fp16 needs a GPU" in capsys.readouterr().err
    assert not (tmp_path / "fp16").exists()
    assert train_main(["--config", "configs/nope.yaml"]) == 2
    assert "config file not found: configs/nope.yaml" in capsys.readouterr().err
    missing = tmp_path / "no-such-dataset"
    assert train_main(tiny_args(missing, tmp_path / "b")) == 2
    assert str(missing) in capsys.readouterr().err
    # an unreadable checkpoint: nothing already saved is touched
    broken = tmp_path / "c" / "checkpoints" / "checkpoint-2"
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"kept")
    assert train_main(tiny_args(data_dir, tmp_path / "c", "--resume_from_checkpoint", str(broken))) == 2
    assert "training_state.json is missing" in capsys.readouterr().err
    assert (broken / "model.safetensors").read_bytes() == b"kept"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir) -> Path:
    """A finished tiny run (checkpoints 4 and 6) that tests copy before damaging it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_main(tiny_args(data_dir, out)) == 0
    return out


def damaged_copy(finished_run: Path, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out, {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def assert_untouched(before: dict[str, bytes]) -> None:
    for path, content in before.items():
        assert Path(path).read_bytes() == content, f"{path} changed"


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "random_states_0.pkl").write_bytes(b"not a pickle"),
     "cannot resume exactly from .*checkpoint-6: random_states_0.pkl is unreadable"),
    (lambda c: (c / "training_state.json").write_text(json.dumps(
        {**json.loads((c / "training_state.json").read_text()), "global_step": "four"})),
     r"training_state.json.global_step must be an integer, got 'four'"),
], ids=["random-states", "wrong-types"])
def test_a_damaged_checkpoint_is_refused_before_anything_is_written(tmp_path, data_dir, finished_run, capsys,
                                                                    damage, message):
    out, _ = damaged_copy(finished_run, tmp_path)
    damage(out / "checkpoints" / "checkpoint-6")
    before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert train_main(tiny_args(data_dir, out, "--resume_from_checkpoint", "latest")) == 2
    error = capsys.readouterr().err
    assert re.search(message, error), error
    assert_untouched(before)


def test_fewer_samples_than_one_batch_fail_before_anything_is_built(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert train_main(tiny_args(data_dir, out, "--train_batch_size", "4096", "--training.feature_store", "auto")) == 2
    assert re.search(r"the training split has \d+ samples, fewer than one batch of training.train_batch_size=4096 "
                     r"on each of 1 process\(es\)", capsys.readouterr().err)
    assert not (tmp_path / "feature_stores").exists()


def test_an_output_dir_that_is_a_file_fails_before_any_loading(tmp_path, data_dir, capsys):
    taken = tmp_path / "taken"
    taken.write_text("kept")
    assert train_main(tiny_args(data_dir, taken)) == 2
    assert f"training.output_dir '{taken}' is a file" in capsys.readouterr().err
    assert taken.read_text() == "kept"


def test_resuming_with_another_model_shape_names_the_differing_fields(tmp_path, data_dir, finished_run, capsys):
    out, before = damaged_copy(finished_run, tmp_path)
    args = tiny_args(data_dir, out, "--resume_from_checkpoint", "latest", "--model.fusion.hidden_dim", "96")
    assert train_main(args) == 2
    error = capsys.readouterr().err
    assert re.search(r"cannot resume from .*checkpoint-6: it was saved with model.fusion.hidden_dim = \d+ "
                     r"\(this config: 96\); resume with the same settings", error), error
    assert len(error.strip().splitlines()[-1]) < 400 and "size mismatch" not in error
    assert_untouched(before)


def test_a_resumed_run_replaces_replayed_metrics_and_applies_retention(tmp_path, data_dir, finished_run):
    """Killed right after step 6 was logged and its checkpoint renamed, before retention ran: an extra old
    checkpoint is left, and the resumed run replays nothing it already recorded."""
    import shutil

    out, _ = damaged_copy(finished_run, tmp_path)
    shutil.copytree(out / "checkpoints" / "checkpoint-4", out / "checkpoints" / "checkpoint-2")
    assert train_main(tiny_args(data_dir, out, "--resume_from_checkpoint", "latest")) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    out, _ = damaged_copy(finished_run, tmp_path / "again")
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    assert train_main(tiny_args(data_dir, out, "--resume_from_checkpoint", "latest")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_save_the_disk_refuses_names_the_path_and_keeps_earlier_checkpoints(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-checkpoint-4").write_text("in the way")  # the save of step 4 cannot create its folder
    assert train_main(tiny_args(data_dir, out)) == 2
    error = capsys.readouterr().err
    assert "saving checkpoint-4 failed" in error and ".tmp-checkpoint-4" in error and "intact" in error
    assert (out / "checkpoints" / "checkpoint-2" / "training_state.json").is_file()


def test_init_from_a_truncated_policy_names_the_file_before_writing(tmp_path, data_dir, finished_run, capsys):
    import shutil

    policy = tmp_path / "policy"
    shutil.copytree(finished_run / "final", policy)
    weights = policy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert train_main(tiny_args(data_dir, tmp_path / "new", "--training.init_from", str(policy))) == 2
    assert f"{weights} is not a readable safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_eval_libero_steps_without_the_simulator_fails_before_training(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libero", None)  # how Python sees a package that is not installed
    out = tmp_path / "run"
    assert train_main(tiny_args(data_dir, out, "--eval_libero_steps", "2")) == 2
    assert "the LIBERO simulator is not installed: pip install -e '.[sim]'" in capsys.readouterr().err
    assert not out.exists()  # it failed before building anything


def test_a_new_run_refuses_an_output_dir_with_earlier_checkpoints(tmp_path, data_dir, capsys):
    earlier = tmp_path / "run" / "checkpoints" / "checkpoint-500"
    earlier.mkdir(parents=True)
    (earlier / "model.safetensors").write_bytes(b"kept")
    assert train_main(tiny_args(data_dir, tmp_path / "run")) == 2
    error = capsys.readouterr().err
    assert f"{earlier.parent} (checkpoint-500)" in error
    assert "pass --resume_from_checkpoint latest to continue it, or choose another --output_dir" in error
    assert (earlier / "model.safetensors").read_bytes() == b"kept"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SIM, reason="the LIBERO simulator ([sim] extra) is not installed")
def test_a_failed_simulator_evaluation_is_logged_and_training_goes_on(tmp_path, data_dir, monkeypatch):
    # a real fault: the simulator workers cannot render (a machine without a working MUJOCO_GL backend), so
    # every episode of both evaluations ends in an error; the workers are spawned and read this environment
    monkeypatch.setenv("MUJOCO_GL", "no-such-backend")
    out, log = tmp_path / "run", tmp_path / "train.log"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 99, "train/loss": 9.0}) + "\n")  # an earlier run's
    assert train_main(tiny_args(data_dir, out, "--eval_libero_steps", "3", "--eval.tasks", "[0]",
                                "--eval.initial_states", "[0]", "--eval.num_workers", "1", "--eval.videos", "false",
                                "--log", str(log))) == 0
    errors = [line for line in log.read_text().splitlines() if " ERROR " in line]
    assert len(errors) == 2 and ["step 3:" in errors[0], "step 6:" in errors[1]] == [True, True]
    assert all("evaluation failed and is skipped, training continues: EvaluationFailed: all 1 episodes ended in an "
               "error" in line and "invalid value for environment variable MUJOCO_GL: no-such-backend" in line
               for line in errors)
    for step in (3, 6):  # what the evaluation saw is kept for the user to read
        [episode] = json.loads((out / "eval" / f"step-{step}" / "results.json").read_text())["episodes_detail"]
        assert "MUJOCO_GL" in episode["error"] and episode["success"] is False
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 2, 3, 4, 5, 6]  # a new run: a new log
    assert not any(key.startswith("eval/") for row in rows for key in row)  # no success rate of 0 was logged
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_synthetic_data_is_written_only_where_the_demo_config_points(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a folder of the user's own: relative paths mean it
    demo = str(REPO / "configs" / "demo.yaml")
    # a source named on the command line that is not there: an error naming it, and nothing written
    assert train_main(["--config", demo, "--data.source", "my_data", "--output_dir", "run", "--log", "train.log"]) == 2
    assert f"train.py: error: data source {tmp_path / 'my_data'} does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    # the demo config's own folder, where it runs: written there, with a line that says so
    assert train_main(["--config", demo, "--output_dir", "run", "--log", "train.log", "--model.image_size", "28",
                       "--train_batch_size", "8", "--max_train_steps", "2", "--validation_steps", "2",
                       "--checkpointing_steps", "2", "--logging.log_media", "false"]) == 0
    data = tmp_path / "outputs" / "demo_data"
    assert (f"data.source {data} does not exist: writing the synthetic demo dataset there (data.generate_synthetic)"
            in (tmp_path / "train.log").read_text())
    assert (data / "meta" / "info.json").is_file() and (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs", "run", "train.log"]


@pytest.mark.slow
def test_tensorboard_gets_the_same_scalars(tmp_path, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    run([sys.executable, "train.py", *tiny_args(data_dir, out, "--report_to", "tensorboard")])
    [events] = [p for p in (out / "logs").rglob("events.out.tfevents.*") if p.parent.name == "atlas-vla"]
    accumulator = EventAccumulator(str(events)).Reload()
    scalars = {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
               for tag in accumulator.Tags()["scalars"]}
    assert set(MISSION_METRICS) <= set(scalars)
    assert_same_scalars(scalars, out, rel=1e-6)  # TensorBoard keeps float32


@pytest.mark.slow
def test_in_process_training_logs_through_its_own_wandb_service_and_ends_it(tmp_path, data_dir, monkeypatch):
    """`train` starts the W&B service of its run with the trackers, once the data and the policy are ready (the
    service ends itself after an idle minute, so it cannot wait through a long data load). Afterwards the
    process holds no WANDB_SERVICE (a later wandb.init starts afresh) and the service is gone."""
    import psutil

    from atlas_vla.training import tracking

    out = tmp_path / "run"
    services = []

    def start(self, start=tracking.WandbService.start):
        assert (out / "norm_stats.json").is_file(), "the service started before the data and policy were ready"
        start(self)
        # the token is `3-<pid>-unix-/tmp/wandb-<helper pid>-<service pid>-<n>/socket`
        service = psutil.Process(int(Path(self.token.split("-unix-", 1)[1]).parent.name.split("-")[2]))
        assert "wandb-core" in " ".join(service.cmdline()) and "--detached" in service.cmdline()
        assert service.pid not in {p.pid for p in psutil.Process().children(recursive=True)}  # not our descendant
        services.append(service)

    monkeypatch.setattr(tracking.WandbService, "start", start)
    assert train_main(tiny_args(data_dir, out, "--report_to", "wandb")) == 0
    [service] = services
    assert "WANDB_SERVICE" not in os.environ
    deadline = time.monotonic() + 10
    while service.is_running() and service.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the W&B service outlived its run"
        time.sleep(0.1)
    [run_file] = find_run_files(out)
    logged = read_run(run_file)
    assert logged.exit_code == 0 and [s for s, _ in logged.history["train/loss"]] == [1, 2, 3, 4, 5, 6]
