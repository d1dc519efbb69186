"""Closed-loop LIBERO evaluation: the real simulator (the [sim] extra), the protocol's conventions
checked against recorded simulator demonstrations, and the eval-libero command end to end."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import HAS_SIM
from PIL import Image

from atlas_vla.cli import main as cli
from atlas_vla.data.spec import SampleSpec
from atlas_vla.data.transforms import observation_to_sample, rotate_180
from atlas_vla.eval import libero_sim as sim
from atlas_vla.runtime import PolicyRuntime

REPO = Path(__file__).resolve().parents[2]
needs_sim = pytest.mark.skipif(not HAS_SIM, reason="the LIBERO simulator ([sim] extra) is not installed")
os.environ.setdefault("MUJOCO_GL", "egl")


def axis_angle_to_quat_xyzw(rotation: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(rotation)
    axis = rotation / angle if angle > 1e-12 else np.zeros(3)
    return np.r_[axis * np.sin(angle / 2), np.cos(angle / 2)]


def test_simulator_observations_take_the_training_path(observation_file):
    """A raw (upside-down) simulator observation becomes exactly the real upright fixture observation,
    and both go through the same sample transform as training."""
    fixture = dict(np.load(observation_file))
    raw = {"agentview_image": rotate_180(fixture["agentview_image"]),
           "robot0_eye_in_hand_image": rotate_180(fixture["wrist_image"]),
           "robot0_eef_pos": fixture["state"][:3], "robot0_eef_quat": axis_angle_to_quat_xyzw(fixture["state"][3:6]),
           "robot0_gripper_qpos": fixture["state"][6:]}
    observation = sim.sim_observation(raw, str(fixture["task_description"]))
    np.testing.assert_array_equal(observation["agentview_image"], fixture["agentview_image"])
    np.testing.assert_array_equal(observation["wrist_image"], fixture["wrist_image"])
    np.testing.assert_allclose(observation["state"], fixture["state"], atol=1e-9)
    spec = SampleSpec(image_size=224)
    a = observation_to_sample(observation, spec)
    b = observation_to_sample({**fixture, "task_description": str(fixture["task_description"])}, spec)
    np.testing.assert_array_equal(np.asarray(a["observation.images"]), np.asarray(b["observation.images"]))


def test_without_the_simulator_the_command_says_which_extra(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libero" else real(name, *a))
    assert cli(["eval-libero", "--checkpoint", str(tmp_path), "--suite", "libero_spatial"]) == 2
    assert "pip install -e '.[sim]'" in capsys.readouterr().err


def test_parse_range_and_summary():
    assert sim.parse_range("0,3,5-7") == [0, 3, 5, 6, 7]
    with pytest.raises(ValueError, match="expected a list like"):
        sim.parse_range("a-b")
    results = [sim.EpisodeResult("libero_spatial", 0, i, "x", i < 3, 10, 1.0) for i in range(4)]
    results.append(sim.EpisodeResult("libero_spatial", 1, 0, "", False, 0, 0.0, error="worker died"))
    summary = sim.summarize(results)
    assert summary["tasks"][0]["success_rate"] == 0.75 and summary["tasks"][1]["errors"] == 1
    assert summary["success_rate"] == pytest.approx(3 / 5)


def test_results_files_have_a_versioned_schema_and_eval_report_compares_them(tmp_path, capsys):
    result = sim.EpisodeResult
    base = [result("libero_spatial", task, state, f"task {task}", state < 3 - task, 50, 1.0, seed=7)
            for task in (0, 1) for state in range(4)]
    swapped = [result("libero_spatial_swap", 0, state, "task 0", state == 0, 220, 1.0, failure="no grasp")
               for state in range(4)]
    summary = sim.summarize(base + swapped)
    assert summary["suites"]["libero_spatial"]["tasks"][0]["successes"] == 3
    assert summary["suites"]["libero_spatial_swap"]["interval_95"] == pytest.approx([0.0456, 0.6994], abs=1e-4)
    assert summary["episodes_detail"][0]["seed"] == 7 and summary["episodes"] == 12
    first = sim.save_results(tmp_path / "a.json", "libero_spatial", summary, {"policy": "a"})
    written = json.loads(first.read_text())
    assert written["schema"] == sim.RESULTS_SCHEMA and set(written["episodes_detail"][0]) >= {
        "suite", "task_id", "instruction", "initial_state", "seed", "success", "steps", "seconds", "failure",
        "error", "video"}
    second = sim.save_results(tmp_path / "b.json", "libero_spatial", sim.summarize(base), {"policy": "b"})
    assert cli(["eval-report", str(first), str(second)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["suite", "task", "0", "task", "1", "average"]
    assert table[1].split()[1:] == ["libero_spatial", "3/4", "2/4", "5/8", "62.5%", "[31-86%]"]
    assert table[2].split()[1:] == ["libero_spatial_swap", "1/4", "-", "1/4", "25.0%", "[5-70%]"]
    assert table[3].split()[1:4] == ["libero_spatial", "3/4", "2/4"] and str(second) in table[3]
    assert sim.eval_metrics("libero_spatial", summary)["eval/libero_spatial_swap/task_0"] == 0.25
    (tmp_path / "other.json").write_text('{"accuracy": 1}')
    assert cli(["eval-report", str(tmp_path / "other.json")]) == 2
    assert "not an eval-libero results file" in capsys.readouterr().err


class ReplayPolicy:
    """A `ChunkPredictor` that replays recorded actions, one per query (the protocol's plumbing, no learning)."""

    spec = SampleSpec()

    def __init__(self, actions: np.ndarray) -> None:
        self.actions, self.t, self.observations = actions, 0, []

    def reset(self) -> None:
        self.t = 0

    def observe(self, observation):
        raise AssertionError("one action per query: every step queries")

    def predict_chunk(self, observation):
        self.observations.append(observation)
        action = self.actions[min(self.t, len(self.actions) - 1)]
        self.t += 1
        return action[None]


@needs_sim
@pytest.mark.sim
@pytest.mark.slow
def test_recorded_demo_replays_to_success_from_its_initial_state(sim_demos_dir):
    """Episode 0 of sim_demos was recorded from libero_spatial task 0, initial state 0, 128x128 cameras,
    after the 10 settling steps: our reset must reproduce its first frame and state, and replaying its
    actions open-loop must succeed. This pins image orientation, state layout and the gripper sign."""
    table = pq.read_table(sim_demos_dir / "data" / "chunk-000" / "episode_000000.parquet")
    actions = np.stack(table["actions"].to_pylist()).astype(np.float64)
    states = np.stack(table["state"].to_pylist())
    first_frame = np.asarray(Image.open(io.BytesIO(table["image"][0].as_py()["bytes"])).convert("RGB"))
    instruction, bddl, init_states = sim.task_info("libero_spatial", 0)
    env = sim.make_env(bddl, 128)
    try:
        policy = ReplayPolicy(actions)
        success, steps, failure = sim.run_episode(env, PolicyRuntime(policy, replan_steps=1), init_states[0],
                                                  instruction, max_steps=len(actions) + 20)
    finally:
        env.close()
    first = policy.observations[0]
    np.testing.assert_allclose(first["state"], states[0], atol=2e-3)
    assert np.abs(first["agentview_image"].astype(float) - first_frame).mean() < 6  # JPEG noise only
    assert np.abs(rotate_180(first["agentview_image"]).astype(float) - first_frame).mean() > 20  # orientation matters
    assert success and steps <= len(actions) + 1 and failure is None


@needs_sim
@pytest.mark.sim
@pytest.mark.slow
def test_steps_without_cameras_change_nothing_but_their_own_frames():
    """`cameras_off` (the settling steps' and a replay's) renders nothing inside its block, and leaves the physics and
    every later observation, frames included, exactly as plain stepping gives them: the protocol's start with its
    first nine settling steps unrendered equals the ten rendered ones, pixel for pixel, and so do the steps after."""
    _, bddl, init_states = sim.task_info("libero_spatial", 1)
    env = sim.make_env(bddl, 128)
    move = [0.4, -0.3, 0.2, 0.0, 0.1, 0.0, -1.0]
    try:
        def run(start):
            observations = [start()] + [env.step(move)[0] for _ in range(4)]
            return observations, env.get_sim_state().copy()

        def plain_start():
            env.seed(0)
            env.reset()
            env.set_init_state(init_states[3])
            return [env.step(list(sim.WAIT_ACTION))[0] for _ in range(sim.NUM_WAIT_STEPS)][-1]

        fast, fast_state = run(lambda: sim.start_episode(env, init_states[3]))
        with sim.cameras_off(env):
            dark = env.step(move)[0]
            with pytest.raises(NotImplementedError, match="segmentation"):  # not a black frame of the wrong shape
                env.sim.render(128, 128, camera_name="agentview", segmentation=True)
        slow, slow_state = run(plain_start)
    finally:
        env.close()
    np.testing.assert_array_equal(fast_state, slow_state)
    for a, b in zip(fast, slow):
        for camera in ("agentview_image", "robot0_eye_in_hand_image"):
            np.testing.assert_array_equal(a[camera], b[camera])
            assert a[camera].mean() > 20  # a real frame
        np.testing.assert_array_equal(a["robot0_eef_pos"], b["robot0_eef_pos"])
    assert not dark["agentview_image"].any() and not dark["robot0_eye_in_hand_image"].any()


@needs_sim
@pytest.mark.sim
@pytest.mark.slow
def test_eval_libero_runs_a_real_rollout_with_a_tiny_policy(tmp_path, sim_demos_dir):
    from helpers import tiny_policy_config

    from atlas_vla.data.normalization import compute_norm_stats
    from atlas_vla.data.sources import load_libero
    from atlas_vla.models.policy import AtlasPolicy

    stats = compute_norm_stats(load_libero(str(sim_demos_dir), max_episodes=2))
    checkpoint = AtlasPolicy(tiny_policy_config(), stats).save_pretrained(tmp_path / "policy")
    videos, output = tmp_path / "videos", tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "atlas_vla.cli", "eval-libero", "--checkpoint", str(checkpoint), "--suite",
         "libero_spatial", "--tasks", "0", "--initial-states", "30", "--max-steps", "20", "--replan-steps", "2",
         "--camera-size", "128", "--video-dir", str(videos), "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "MUJOCO_GL": "egl"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    [episode] = report["episodes_detail"]
    # an untrained policy in 20 steps: the bowl is never held, and the files say so
    assert episode["error"] is None and episode["initial_state"] == 30 and episode["success"] is False
    assert episode["steps"] == 20 and episode["failure"] == "no grasp"
    assert report["tasks"]["0"]["episodes"] == 1 and report["successes"] == 0 and report["success_rate"] == 0.0
    assert report["failures"] == {"no grasp": 1}
    assert "libero_spatial:" in result.stdout
    import imageio.v2 as imageio

    frames = imageio.mimread(episode["video"], memtest=False)
    assert len(frames) == episode["steps"] == 20 and frames[0].shape == (128, 128, 3)


@needs_sim
@pytest.mark.sim
@pytest.mark.slow
def test_eval_through_a_running_server_matches_the_in_process_rollout(tmp_path, sim_demos_dir):
    """`eval-libero --server` (a simulator worker as a thin client of `atlas-vla serve`) runs the same episodes
    as `run_episode` with the policy in this process: every chunk the server answered equals the in-process
    chunk of that step, with the temporal context (2 frames) kept per episode, and a runtime that does not reset
    its history between episodes is told apart."""
    from helpers import tiny_policy_config

    from atlas_vla.data.normalization import compute_norm_stats
    from atlas_vla.data.sources import load_libero
    from atlas_vla.models.policy import AtlasPolicy
    from atlas_vla.runtime import LocalPolicy
    from atlas_vla.serving.server import serve_in_background

    class Answers:
        """The policy behind the server, every chunk it answers written down in the order asked."""

        def __init__(self, policy: AtlasPolicy) -> None:
            self.policy, self.chunks = policy, []

        def __getattr__(self, name: str):
            return getattr(self.policy, name)

        def eval(self) -> "Answers":
            self.policy.eval()
            return self

        def predict_action_chunk(self, batch):
            chunks = self.policy.predict_action_chunk(batch)
            self.chunks.extend(chunks.cpu().numpy().astype(np.float64))
            return chunks

    class Local(LocalPolicy):
        """The policy in this process, its chunks written down."""

        def __init__(self, policy: AtlasPolicy) -> None:
            super().__init__(policy)
            self.chunks: list[np.ndarray] = []

        def predict_chunk(self, observation):
            self.chunks.append(super().predict_chunk(observation))
            return self.chunks[-1]

    class NoReset(Local):
        """A history that is not reset between episodes (what a server that mixed up histories would do)."""

        def reset(self) -> None:
            pass

    stats = compute_norm_stats(load_libero(str(sim_demos_dir), max_episodes=2))
    policy = AtlasPolicy(tiny_policy_config(num_temporal_frames=2), stats).eval()
    answers = Answers(policy)
    output = tmp_path / "results.json"
    with serve_in_background(answers, port=0, api_key="test-key") as server:  # one worker: its queries in order
        assert cli(["eval-libero", "--server", f"ws://127.0.0.1:{server.port}", "--api-key", "test-key", "--suite",
                    "libero_spatial", "--tasks", "0", "--initial-states", "30,31", "--max-episode-steps", "12",
                    "--replan-steps", "3", "--camera-size", "128", "--num-workers", "1", "--output", str(output)]) == 0
    served = json.loads(output.read_text())["episodes_detail"]
    assert "test-key" not in output.read_text()
    assert [episode["initial_state"] for episode in served] == [30, 31]
    envs: dict = {}
    local, broken = Local(policy), NoReset(policy)
    try:
        for episode in served:
            spec = sim.EpisodeSpec("libero_spatial", 0, episode["initial_state"], max_steps=12, replan_steps=3,
                                   camera_size=128)
            here = sim.evaluate_episode(spec, local, envs)
            sim.evaluate_episode(spec, broken, envs)
            assert episode["error"] is None and here.error is None
            assert (episode["success"], episode["steps"], episode["failure"]) == (here.success, here.steps,
                                                                                 here.failure)
    finally:
        for env in envs.values():
            env.close()
    assert len(answers.chunks) == len(local.chunks) == 8  # 12 steps, a chunk every 3: 4 queries per episode
    served_chunks, local_chunks = np.stack(answers.chunks), np.stack(local.chunks)
    np.testing.assert_allclose(served_chunks, local_chunks, atol=1e-5)  # the wire's float32, nothing more
    # a history carried over from the previous episode changes the second episode's first chunk far beyond that
    assert np.abs(np.stack(broken.chunks)[4, :, :6] - local_chunks[4, :, :6]).max() > 100 * 1e-5
    np.testing.assert_allclose(np.stack(broken.chunks)[:4], local_chunks[:4], atol=1e-5)


@needs_sim
@pytest.mark.sim
@pytest.mark.slow
def test_training_evaluates_in_the_simulator_on_the_main_process(tmp_path):
    from helpers import synthetic_dataset
    from wandb_records import find_run_files, read_run

    data = synthetic_dataset(tmp_path, num_episodes=4)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/demo.yaml", "--data.source", str(data),
         "--data.generate_synthetic", "false", "--data.val_fraction", "0.25", "--output_dir", str(out),
         "--model.image_size", "56", "--train_batch_size", "4", "--max_train_steps", "2", "--eval_libero_steps", "2",
         "--eval.tasks", "[0]", "--eval.initial_states", "[0]", "--eval.max_steps", "3", "--eval.camera_size", "128",
         "--eval.num_workers", "1", "--report_to", "wandb"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "MUJOCO_GL": "egl", "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "eval" / "step-2" / "results.json").read_text())
    assert report["episodes"] == 1 and report["episodes_detail"][0]["steps"] == 3
    [run_file] = find_run_files(out)
    history = read_run(run_file).history
    assert [step for step, _ in history["eval/success_rate"]] == [2]
    assert "eval/libero_spatial/task_0" in history and "eval/failures/no_grasp" in history
    assert report["settings"]["eval"]["initial_states"] == [0]  # what a model card's result needs
    # the final policy version (evaluated before its checkpoint) holds the evaluation of its own weights
    [policy] = [artifact for artifact in read_run(run_file).artifacts if artifact.type == "model"]
    [record] = policy.metadata["evaluations"]
    assert (record["suite"], record["episodes"], record["step"], record["initial_states"]) == (
        "libero_spatial", 1, 2, [0])
    assert record["success_rate"] == report["success_rate"] and record["results"] == str(out / "eval" / "step-2" / "results.json")


@needs_sim
@pytest.mark.sim
@pytest.mark.slow
def test_libero_pro_suites_run_and_a_suite_that_cannot_run_says_which_can(tmp_path, capsys, sim_demos_dir):
    from helpers import tiny_policy_config

    from atlas_vla.data.normalization import compute_norm_stats
    from atlas_vla.data.sources import load_libero
    from atlas_vla.eval.config import EvalConfig
    from atlas_vla.models.policy import AtlasPolicy

    # a variant keeps its base suite's episode length
    assert {spec.max_steps for spec in sim.episode_specs(EvalConfig(suite="libero_spatial_swap", tasks=[0],
                                                                   initial_states=[0]))} == {220}
    assert cli(["eval-libero", "--policy", str(tmp_path), "--suite", "libero_spatial_env", "--tasks", "0"]) == 2
    error = capsys.readouterr().err
    assert "'libero_spatial_env' cannot run with the installed simulator (task 0: BDDL file missing" in error
    assert "runnable suites: " in error and "libero_spatial_swap" in error
    assert cli(["eval-libero", "--policy", str(tmp_path), "--suite", "libero_spatial", "--perturbations", "shuffle",
                "--tasks", "0"]) == 2
    assert "unknown perturbation(s) ['shuffle']; expected some of swap, object, lan, task" in capsys.readouterr().err

    stats = compute_norm_stats(load_libero(str(sim_demos_dir), max_episodes=2))
    policy = AtlasPolicy(tiny_policy_config(), stats).save_pretrained(tmp_path / "policy")
    output = tmp_path / "results.json"
    common = ["--policy", str(policy), "--tasks", "0", "--initial-states", "1", "--max-episode-steps", "4",
              "--camera-size", "128", "--num-workers", "2"]
    assert cli(["eval-libero", "--suite", "libero_spatial", "--perturbations", "swap,object,lan", *common,
                "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(output.read_text())
    suites = ["libero_spatial", "libero_spatial_swap", "libero_spatial_object", "libero_spatial_lan"]
    assert list(results["suites"]) == sorted(suites) and results["episodes"] == 4
    assert all(e["error"] is None and e["steps"] == 4 for e in results["episodes_detail"])
    instructions = {e["suite"]: e["instruction"] for e in results["episodes_detail"]}
    assert instructions["libero_spatial_lan"] != instructions["libero_spatial"]  # the paraphrased instruction
    table = printed[printed.index("suite "):].splitlines()
    assert [line.split()[0] for line in table[1:5]] == sorted(suites)
    mug = tmp_path / "mug.json"  # another evaluation: its own results and episode log
    assert cli(["eval-libero", "--suite", "libero_spatial_with_mug", *common, "--output", str(mug)]) == 0
    [episode] = json.loads(mug.read_text())["episodes_detail"]
    assert episode["suite"] == "libero_spatial_with_mug" and episode["error"] is None


@needs_sim
def test_bad_tasks_states_and_checkpoints_fail_before_any_worker(tmp_path, capsys):
    base = ["eval-libero", "--suite", "libero_spatial", "--tasks", "0"]
    assert cli([*base, "--checkpoint", str(tmp_path / "missing"), "--initial-states", "0"]) == 2
    assert "policy folder not found" in capsys.readouterr().err
    assert cli([*base, "--checkpoint", str(tmp_path), "--initial-states", "60"]) == 2
    assert "initial states 0..49, got [60]" in capsys.readouterr().err
    assert cli(["eval-libero", "--suite", "libero_spatial", "--tasks", "12", "--checkpoint", str(tmp_path)]) == 2
    assert "has tasks 0..9, got task 12" in capsys.readouterr().err


@needs_sim
def test_episode_specs_come_from_one_eval_config(tmp_path):
    from atlas_vla.cli import _eval_config, build_parser
    from atlas_vla.eval.config import EvalConfig

    config = EvalConfig(tasks=[0, 2], initial_states=[30, 31], replan_steps=8, camera_size=128)
    specs = sim.episode_specs(config, video_dir=tmp_path)
    assert [(s.task_id, s.initial_state) for s in specs] == [(0, 30), (0, 31), (2, 30), (2, 31)]
    assert {(s.max_steps, s.replan_steps, s.camera_size, s.video_dir, s.ensemble_decay) for s in specs} == {
        (220, 8, 128, str(tmp_path), None)}
    assert all(s.video_dir is None for s in sim.episode_specs(config))  # no folder, no videos
    # eval-libero --config: the run's eval section, then the flags on top
    args = build_parser().parse_args(["eval-libero", "--policy", "p", "--config", "configs/sim_demos.yaml",
                                      "--initial-states", "40-41", "--num-workers", "1"])
    from_run = _eval_config(args)
    assert (from_run.tasks, from_run.initial_states, from_run.num_workers) == ([0, 1, 2, 3, 7], [40, 41], 1)
    assert (from_run.camera_size, from_run.replan_steps) == (128, 8)
    assert [(s.task_id, s.initial_state) for s in sim.episode_specs(from_run)] == [
        (t, s) for t in (0, 1, 2, 3, 7) for s in (40, 41)]


def test_old_flag_spellings_still_work_and_say_so():
    from atlas_vla.cli import _eval_config, build_parser

    argv = ["eval-libero", "--checkpoint", "p", "--suite", "libero_goal", "--temporal-ensemble", "0.1",
            "--max-steps", "30", "--report_to", "wandb"]
    with pytest.warns(FutureWarning, match="--temporal-ensemble is deprecated: use --ensemble-decay"):
        args = build_parser().parse_args(argv)
    config = _eval_config(args)
    assert (args.policy, args.report_to, config.ensemble_decay, config.max_episode_steps) == ("p", "wandb", 0.1, 30)
    assert (config.suite, config.initial_states, config.num_workers) == ("libero_goal", list(range(50)), 1)
