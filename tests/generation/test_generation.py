"""Demonstrations generated in new layouts, in the real LIBERO simulator: a recorded episode re-targeted to moved
objects succeeds and is recorded in its source's schema, sampled layouts leave room and stay in reach, a source whose
replay differs is refused, and a generation killed mid-episode ends with the episodes of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import HAS_SIM, lerobot_subset

from atlas_vla.generation.sources import SourceRefused, frame_difference, read_episodes

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.skipif(not HAS_SIM, reason="the LIBERO simulator ([sim] extra) is not installed"),
              pytest.mark.sim, pytest.mark.slow]
os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture(scope="module")
def one_episode(sim_demos_dir, tmp_path_factory) -> Path:
    """sim_demos' episode 0 (libero_spatial task 0, recorded from initial state 0) as a source of its own."""
    return lerobot_subset(sim_demos_dir, tmp_path_factory.mktemp("source") / "demos", [0])


@pytest.fixture(scope="module")
def generator():
    from atlas_vla.generation.generate import Generator

    live = Generator("libero_spatial", 0, 128)
    yield live
    live.close()


def test_a_recorded_episode_retargeted_to_moved_objects_succeeds(one_episode, generator):
    from atlas_vla.data.transforms import rotate_180
    from atlas_vla.scenes.layouts import Layout
    from atlas_vla.scenes.scene import Pose

    [episode] = read_episodes(str(one_episode))
    assert (episode.suite, episode.task_id, episode.image_format) == ("libero_spatial", 0, "jpeg")
    recovered = generator.recover(episode)
    assert recovered.initial_state == 0
    bowl, plate = generator.goal.obj, generator.goal.target
    assert (bowl, plate) == ("akita_black_bowl_1", "plate_1")
    before = {name: Pose.from_list(pose) for name, pose in recovered.poses.items()}

    def shifted(name: str, dx: float, dy: float) -> Pose:
        x, y, z = before[name].position
        return Pose((x + dx, y + dy, z), before[name].quaternion)

    layout = Layout([0], {bowl: shifted(bowl, 0.0, -0.08), plate: shifted(plate, 0.04, 0.01)})
    observation, layout = generator.lay_out(episode, recovered, layout)
    for name, (dx, dy) in ((bowl, (0.0, -0.08)), (plate, (0.04, 0.01))):
        moved = np.subtract(generator.scene.pose(name).position[:2], before[name].position[:2])
        np.testing.assert_allclose(moved, (dx, dy), atol=0.005)  # settled where it was put
    kept, reason, arrays = generator.attempt(episode, recovered, generator.goal, observation)
    assert kept and reason is None
    assert generator.goal.holds(generator.scene)
    T = len(arrays["actions"])
    assert {key: (value.shape, value.dtype) for key, value in arrays.items()} == {
        "images": ((T, 128, 128, 3), np.uint8), "wrist_images": ((T, 128, 128, 3), np.uint8),
        "states": ((T, 8), np.float32), "actions": ((T, 7), np.float32)}
    assert np.abs(arrays["actions"]).max() <= 1.0 and set(np.unique(arrays["actions"][:, 6])) <= {-1.0, 1.0}
    # training targets: they change from step to step about as the recorded person's do (aimed straight at each
    # waypoint, they swung 2-3 times as much)
    swing = {name: np.abs(np.diff(actions[:, :3], axis=0)).mean()
             for name, actions in (("generated", arrays["actions"]), ("recorded", episode.actions))}
    assert swing["generated"] < 1.5 * swing["recorded"], swing
    # the recorded layout puts the scene back as the episode began: its first frame again
    observation, _ = generator.lay_out(episode, recovered, Layout.from_record(layout.record()))
    assert frame_difference(rotate_180(observation["agentview_image"]), arrays["images"][0]) == 0.0


def test_round_objects_turned_by_a_layout_are_grasped_and_placed_at_the_sources_heading(one_episode, generator):
    """A bowl and a plate look the same at any heading: the layout turns them, the hand does not follow (version 2
    turned the grasp and the placement with them, by angles no camera shows)."""
    from scipy.spatial.transform import Rotation

    from atlas_vla.constants import EEF_ROTATION
    from atlas_vla.scenes.layouts import Layout
    from atlas_vla.scenes.scene import Pose, quaternion_multiply, yaw_quaternion

    scene = generator.scene
    assert [name for name in scene.objects + scene.fixtures if scene.is_round(name)] == [
        "akita_black_bowl_1", "akita_black_bowl_2", "glazed_rim_porcelain_ramekin_1", "plate_1"]  # not the cookie box,
    # the cabinet or the stove
    [episode] = read_episodes(str(one_episode))
    recovered = generator.recover(episode)
    bowl, plate = generator.goal.obj, generator.goal.target
    before = {name: Pose.from_list(pose) for name, pose in recovered.poses.items()}

    def moved(name: str, dx: float, dy: float, turn: float) -> Pose:
        x, y, z = before[name].position
        return Pose((x + dx, y + dy, z), tuple(quaternion_multiply(yaw_quaternion(turn), before[name].quaternion)))

    layout = Layout([0], {bowl: moved(bowl, 0.0, -0.06, 0.7), plate: moved(plate, 0.03, 0.0, -0.7)})
    observation, layout = generator.lay_out(episode, recovered, layout)
    assert abs(generator.scene.pose(bowl).yaw() - before[bowl].yaw() - 0.7) < 0.1  # the layout did turn them
    kept, _, arrays = generator.attempt(episode, recovered, generator.goal, observation)
    assert kept

    def heading(states, actions, phase: str):  # the hand's rotation where the gripper first closes or last opens
        closed = np.flatnonzero(actions[:, 6] > 0)
        return Rotation.from_rotvec(states[closed[0] if phase == "grasp" else closed[-1], EEF_ROTATION])

    for phase in ("grasp", "release"):
        turned = heading(arrays["states"], arrays["actions"], phase) * heading(episode.states, episode.actions,
                                                                                phase).inv()
        assert turned.magnitude() < 0.15, (phase, turned.magnitude())  # 0.7 rad if it had followed


def _record_hdf5(path: Path, episode, generator) -> Path:
    """`episode` replayed and recorded as LIBERO's own demo files hold it: the simulator `states` of every step, the
    raw (upside-down) camera frames, the end effector and gripper, the actions and the attributes."""
    import h5py

    from atlas_vla.data.transforms import quat_to_axis_angle

    observation = generator.start(0)
    frames, wrist, positions, orientations, grippers, sim_states = [], [], [], [], [], []
    for action in episode.actions:
        sim_states.append(generator.env.sim.get_state().flatten())
        frames.append(observation["agentview_image"])
        wrist.append(observation["robot0_eye_in_hand_image"])
        positions.append(observation["robot0_eef_pos"])
        orientations.append(quat_to_axis_angle(observation["robot0_eef_quat"]))
        grippers.append(observation["robot0_gripper_qpos"])
        observation = generator.env.step(action.tolist())[0]
    with h5py.File(path, "w") as file:
        data = file.create_group("data")
        data.attrs["problem_info"] = json.dumps({"problem_name": "libero_tabletop_manipulation",
                                                 "domain_name": "robosuite", "language_instruction": episode.instruction})
        data.attrs["bddl_file_name"] = "libero/bddl_files/libero_spatial/task.bddl"
        data.attrs["env_name"] = "Libero_Tabletop_Manipulation"
        demo = data.create_group("demo_0")
        demo.attrs["num_samples"] = len(episode.actions)
        demo["actions"] = episode.actions.astype(np.float64)
        demo["states"] = np.stack(sim_states)
        obs = demo.create_group("obs")
        obs["agentview_rgb"], obs["eye_in_hand_rgb"] = np.stack(frames), np.stack(wrist)
        obs["ee_pos"], obs["ee_ori"], obs["gripper_states"] = np.stack(positions), np.stack(orientations), np.stack(grippers)
    return path


def test_raw_hdf5_demos_start_from_the_simulator_state_they_recorded(one_episode, generator, tmp_path):
    [recorded] = read_episodes(str(one_episode))
    [episode] = read_episodes(str(_record_hdf5(tmp_path / "pick_up_the_black_bowl_demo.hdf5", recorded, generator)))
    assert (episode.suite, episode.task_id, episode.episode, episode.image_format) == ("libero_spatial", 0, 0, "png")
    recovered = generator.recover(episode)
    assert recovered.initial_state is None  # no search: the file says where it started
    official = generator.recover(recorded).poses
    assert sorted(recovered.poses) == sorted(official)
    for name, pose in recovered.poses.items():  # the same scene (the state's round trip moves the last digit)
        np.testing.assert_allclose(pose, official[name], atol=1e-9)


def test_a_sampled_layout_leaves_room_and_stays_in_reach_and_an_impossible_one_says_why(generator):
    from atlas_vla.scenes.layouts import REACH, LayoutImpossible, layout_rng, sample_layout

    generator.start(0)
    scene = generator.scene
    base = scene.robot_base()[:2]
    fixtures = {name: (np.asarray(scene.sim.data.body_xpos[scene.body(name)][:2]), scene.radius(name))
                for name in scene.fixtures}
    for number in range(20):
        seed, rng = layout_rng("generation", 3, "libero_spatial", 0, number)
        layout = sample_layout(scene, rng, seed)
        assert sorted(layout.placed) == sorted(scene.objects)  # every object of task 0 rests on the table
        discs = {name: (np.asarray(pose.position[:2]), scene.radius(name)) for name, pose in layout.placed.items()}
        for name, (centre, radius) in discs.items():
            relative = centre - base
            assert REACH["x"][0] <= relative[0] <= REACH["x"][1] and REACH["y"][0] <= relative[1] <= REACH["y"][1]
            for other, (other_centre, other_radius) in {**discs, **fixtures}.items():
                if other != name:
                    assert np.linalg.norm(centre - other_centre) >= radius + other_radius, (name, other)
    again = sample_layout(scene, layout_rng("generation", 3, "libero_spatial", 0, 7)[1], [])
    assert again.placed == sample_layout(scene, layout_rng("generation", 3, "libero_spatial", 0, 7)[1], []).placed  # seeded
    assert again.placed != sample_layout(scene, layout_rng("evaluation", 3, "libero_spatial", 0, 7)[1], []).placed
    with pytest.raises(LayoutImpossible) as raised:
        sample_layout(scene, np.random.default_rng(0), [], area={"x": (0.5, 0.6), "y": (0.0, 0.1)}, attempts=3)
    message = str(raised.value)
    assert message.startswith("cannot place ") and "collision-free with 0.01 m clearance in x " in message
    assert message.endswith("3 layouts in a row left no room; widen the area or move fewer objects")
    assert "\n" not in message


def test_a_source_whose_replay_differs_is_refused_naming_the_episode(sim_demos_dir, tmp_path, generator):
    def push_sideways(table: pa.Table) -> pa.Table:
        actions = np.asarray(table.column("actions").to_pylist(), np.float32)
        actions[30:, 1] += 0.5  # the recorded states no longer follow from the actions
        return table.set_column(table.schema.get_field_index("actions"), "actions",
                                pa.array(actions.tolist(), table.schema.field("actions").type))

    altered = lerobot_subset(sim_demos_dir, tmp_path / "altered", [0], alter=push_sideways)
    [episode] = read_episodes(str(altered))
    with pytest.raises(SourceRefused) as raised:
        generator.recover(episode)
    message = str(raised.value)
    assert message.startswith(f"{altered} episode 0: its replay from initial state 0 leaves the recorded path at step 32 ")
    assert message.endswith("its actions do not reproduce its states")

    def another_task(table: pa.Table) -> pa.Table:  # task 0's episode, labelled with task 2's instruction
        return table.set_column(table.schema.get_field_index("task_index"), "task_index",
                                pa.array([2] * len(table), pa.int64()))

    [episode] = read_episodes(str(lerobot_subset(sim_demos_dir, tmp_path / "other", [0], alter=another_task)))
    assert (episode.suite, episode.task_id) == ("libero_spatial", 2)
    from atlas_vla.generation.generate import Generator

    task_2 = Generator("libero_spatial", 2, 128)
    try:  # task 2's initial state 17 is task 0's state 0 to the pixel and the millimetre: the goal tells them apart
        with pytest.raises(SourceRefused) as raised:
            task_2.recover(episode)
    finally:
        task_2.close()
    assert str(raised.value) == (f"{tmp_path / 'other'} episode 0: its replay from initial state 17 does not reach the "
                                 f"goal (within 10 steps of holding still after its last action)")


def test_the_other_bowl_is_a_goal_of_its_own_named_where_it_is(one_episode, generator):
    from atlas_vla.scenes.instructions import instruction, location, same_kind
    from atlas_vla.scenes.layouts import first_usable, layout_rng
    from atlas_vla.scenes.scene import Pose

    [episode] = read_episodes(str(one_episode))
    scene, own = generator.scene, generator.goal
    [twin] = same_kind(scene, own.obj)
    other = own.retargeted(twin)
    assert (other.obj, other.target, other.predicate) == ("akita_black_bowl_2", "plate_1", "on")
    seed, rng = layout_rng("generation", 0, "libero_spatial", 0, 0)

    def both_named() -> str:  # a layout in which each bowl can be told from the other
        return instruction(scene, own, episode.instruction) + " | " + instruction(scene, other, episode.instruction)

    _, layout, words, _ = first_usable(scene, rng, seed, lambda: generator.start(0), generator.settle, both_named)
    mine, theirs = words.split(" | ")
    assert mine != theirs and mine.endswith("and place it on the plate") and theirs.endswith("and place it on the plate")
    assert mine == f"pick up the black bowl {location(scene, own.obj)} and place it on the plate"
    # the simulator checks the goal against the object it names: the twin on the plate is its goal, not the other's
    plate = scene.pose("plate_1").position
    scene.set_pose(twin, Pose((plate[0], plate[1], plate[2] + 0.03), scene.pose(twin).quaternion))
    scene.sim.forward()
    generator.settle()
    assert other.holds(scene) and not own.holds(scene)


def test_a_bowl_in_a_drawer_and_a_bowl_still_falling_are_named_and_laid_out_where_they_are(generator):
    """Tasks with no demonstrations here: task 4's goal bowl is in the cabinet's top drawer, its twin on the cabinet
    (both on the one fixture); task 5's initial state drops its bowl onto the ramekin, where it comes to lean on it
    after the protocol's settling steps."""
    from atlas_vla.generation.generate import Generator
    from atlas_vla.scenes.instructions import instruction, same_kind
    from atlas_vla.scenes.layouts import _groups, first_usable, layout_rng

    generator.start(3)  # task 0's state 3: the goal bowl stands against the plate, upright; each moves on its own
    assert ("akita_black_bowl_1", "plate_1") in generator.scene.touching()
    assert _groups(generator.scene)["akita_black_bowl_1"] == ["akita_black_bowl_1"]

    drawer = Generator("libero_spatial", 4, 128)
    try:
        scene, goal = drawer.scene, drawer.goal
        [twin] = same_kind(scene, goal.obj)
        seed, rng = layout_rng("generation", 0, "libero_spatial", 4, 0)
        _, layout, words, _ = first_usable(scene, rng, seed, lambda: drawer.start_try(0, None), drawer.settle,
                                           lambda: instruction(scene, goal, "") + " | "
                                           + instruction(scene, goal.retargeted(twin), ""))
        assert words.split(" | ") == [
            "pick up the black bowl in the top drawer of the wooden cabinet and place it on the plate",
            "pick up the black bowl on the wooden cabinet and place it on the plate"]
        assert goal.obj not in layout.placed and twin not in layout.placed and "plate_1" in layout.placed
    finally:
        drawer.close()

    leaning = Generator("libero_spatial", 5, 128)
    try:
        scene, goal = leaning.scene, leaning.goal
        leaning.start(0)
        assert scene.moving() == [goal.obj]  # the protocol's 10 steps: the bowl is still falling
        leaning.start_try(0, None)
        assert scene.moving() == []
        ramekin = next(group for root, group in _groups(scene).items() if goal.obj in group)
        assert sorted(ramekin) == [goal.obj, "glazed_rim_porcelain_ramekin_1"]  # they move as one
        for number in range(3):
            seed, rng = layout_rng("generation", 0, "libero_spatial", 5, number)
            _, layout, words, rejected = first_usable(scene, rng, seed, lambda: leaning.start_try(0, None),
                                                      leaning.settle, lambda: instruction(scene, goal, ""))
            assert rejected == {} and goal.obj in layout.placed
            assert words.startswith("pick up the black bowl ") and words.endswith(" and place it on the plate")
    finally:
        leaning.close()


def _generate(source: Path, output: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "atlas_vla.cli", "generate-demos", "--source", str(source),
                             "--output", str(output), "--num-demos", "2", "--seed", "5"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"})


def _episodes(folder: Path) -> list[tuple]:
    """What a generated dataset holds, by value: each episode's metadata and its columns."""
    rows = [json.loads(line) for line in (folder / "meta" / "episodes.jsonl").read_text().splitlines()]
    found = []
    for row in rows:
        file = folder / "data" / "chunk-000" / f"episode_{row['episode_index']:06d}.parquet"
        columns = pq.read_table(file).to_pydict()
        # unknown positions are NaN, which equals nothing: compared as None
        columns["object_positions"] = [[None if np.isnan(v) else v for v in frame]
                                       for frame in columns["object_positions"]]
        found.append((row, columns))
    return found


@pytest.mark.timeout(2700)  # three generation runs: about 8 minutes on a quiet 2-core machine
def test_a_generation_killed_mid_episode_resumes_to_the_episodes_of_an_uninterrupted_one(one_episode, tmp_path,
                                                                                        sim_demos_dir):
    whole = _generate(one_episode, tmp_path / "whole")
    output = whole.communicate(timeout=1500)[0]
    assert whole.returncode == 0, output[-3000:]
    assert "libero_spatial/0: 2 episodes written; kept " in output

    killed = _generate(one_episode, tmp_path / "killed")
    tries = tmp_path / "killed.generation" / "tries.jsonl"
    try:
        deadline = time.monotonic() + 1200
        while not (tries.is_file() and len(tries.read_text().splitlines()) >= 2):  # the header and one try
            assert killed.poll() is None and time.monotonic() < deadline, "the generation ended before its first try"
            time.sleep(0.5)
        time.sleep(8)  # well into the next try's episode
    finally:  # the job and its simulator workers, as a scheduler kills a job
        os.killpg(killed.pid, signal.SIGKILL)
        killed.communicate()
    assert not (tmp_path / "killed").exists()  # nothing that looks finished
    finished = len(tries.read_text().splitlines()) - 1
    resumed = _generate(one_episode, tmp_path / "killed")
    output = resumed.communicate(timeout=1500)[0]
    assert resumed.returncode == 0, output[-3000:]
    records = [json.loads(line) for line in tries.read_text().splitlines()[1:]]
    assert [r["try"] for r in records][:finished] == list(range(finished))  # the finished tries were not run again
    assert _episodes(tmp_path / "killed") == _episodes(tmp_path / "whole")

    # the dataset: the source's schema, loadable as a source, with each episode's layout and a truthful instruction
    generated = tmp_path / "whole"
    source_file = sim_demos_dir / "data" / "chunk-000" / "episode_000000.parquet"
    schema = pq.read_schema(generated / "data" / "chunk-000" / "episode_000000.parquet").remove_metadata()
    assert schema.remove(schema.get_field_index("object_positions")) == pq.read_schema(source_file).remove_metadata()
    info, source_info = (json.loads((folder / "meta" / "info.json").read_text()) for folder in (generated, sim_demos_dir))
    assert info["features"].pop("object_positions")["shape"] == [6]
    assert (info["features"], info["fps"]) == (source_info["features"], source_info["fps"])
    report = json.loads((generated / "generation.json").read_text())
    row = report["tasks"]["libero_spatial/0"]
    assert row["used"] == 2 and row["kept"] >= 2 and row["tries"] == row["kept"] + sum(row["rejected"].values())
    for meta, columns in _episodes(generated):
        assert meta["generation"]["task"] == "libero_spatial/0" and meta["generation"]["initial_state"] == 0
        assert set(meta["generation"]["layout"]["placed"]) == {"akita_black_bowl_1", "akita_black_bowl_2", "cookies_1",
                                                               "glazed_rim_porcelain_ramekin_1", "plate_1"}
        [instruction] = meta["tasks"]
        assert instruction.startswith("pick up the black bowl ") and instruction.endswith(" and place it on the plate")
        assert columns["image"][0]["bytes"][:2] == b"\xff\xd8"  # JPEG, as the source stores its frames
        # where the goal's object rests until the gripper first closes (unknown after), and the plate, every frame
        settled, goal = meta["generation"]["layout"]["settled"], meta["generation"]["goal_object"]
        assert meta["generation"]["target"] == "plate_1"
        grasp = next(t for t, action in enumerate(columns["actions"]) if action[-1] > 0)
        positions = columns["object_positions"]
        assert positions[:grasp] == [pytest.approx(settled[goal][:3] + settled["plate_1"][:3], abs=1e-6)] * grasp
        assert {tuple(p[:3]) for p in positions[grasp:]} == {(None,) * 3}
        assert {tuple(p[3:]) for p in positions[grasp:]} == {tuple(positions[0][3:])}
    from atlas_vla.data.sources import load_libero

    assert len(load_libero(str(generated))) == info["total_frames"]


def test_eval_libero_on_random_layouts_records_each_layout_and_names_the_bowl_where_it_is(tmp_path, sim_demos_dir):
    from helpers import tiny_policy_config

    from atlas_vla.data.normalization import compute_norm_stats
    from atlas_vla.data.sources import load_libero
    from atlas_vla.scenes.layouts import layout_rng
    from atlas_vla.models.policy import AtlasPolicy

    stats = compute_norm_stats(load_libero(str(sim_demos_dir), max_episodes=2))
    policy = AtlasPolicy(tiny_policy_config(), stats).save_pretrained(tmp_path / "policy")

    def evaluate(output: Path) -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "atlas_vla.cli", "eval-libero", "--policy", str(policy), "--suite", "libero_spatial",
             "--tasks", "0", "--initial-states", "30,31", "--max-episode-steps", "3", "--camera-size", "128",
             "--layouts", "random", "--layout-seed", "5", "--output", str(output)],
            cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "MUJOCO_GL": "egl"})
        assert result.returncode == 0, result.stderr[-3000:]
        assert "layouts: random, layout seed 5 (the evaluation's own seed stream" in result.stdout
        return json.loads(output.read_text())

    report = evaluate(tmp_path / "a.json")
    assert (report["settings"]["eval"]["layouts"], report["settings"]["eval"]["layout_seed"]) == ("random", 5)
    episodes = report["episodes_detail"]
    assert [e["initial_state"] for e in episodes] == [30, 31] and all(e["error"] is None for e in episodes)
    for episode in episodes:
        layout = episode["layout"]
        assert layout["seed"] == layout_rng("evaluation", 5, "libero_spatial", 0, episode["initial_state"])[0]
        assert layout["seed"] != layout_rng("generation", 5, "libero_spatial", 0, episode["initial_state"])[0]
        assert sorted(layout["placed"]) == ["akita_black_bowl_1", "akita_black_bowl_2", "cookies_1",
                                            "glazed_rim_porcelain_ramekin_1", "plate_1"]
        assert episode["instruction"].startswith("pick up the black bowl ")
        assert "between the plate and the ramekin" not in episode["instruction"]  # the official words, now untrue
    assert episodes[0]["layout"]["placed"] != episodes[1]["layout"]["placed"]
    again = evaluate(tmp_path / "b.json")  # the same seed: the same layouts and instructions
    assert [(e["layout"], e["instruction"]) for e in again["episodes_detail"]] == \
        [(e["layout"], e["instruction"]) for e in episodes]
