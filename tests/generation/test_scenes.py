"""`atlas-vla render-scenes` in the real LIBERO simulator: one-frame scenes of a recorded task in new layouts, with
the instruction that names the goal's object where it is and where that object and its target rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import HAS_SIM, lerobot_subset

pytestmark = [pytest.mark.skipif(not HAS_SIM, reason="the LIBERO simulator ([sim] extra) is not installed"),
              pytest.mark.sim, pytest.mark.slow]
os.environ.setdefault("MUJOCO_GL", "egl")


def _render(source: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atlas_vla.cli", "render-scenes", "--source", str(source), "--output",
                           str(output), "--initial-states", "0,1", *extra], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.timeout(1800)  # three short runs: about 3 minutes on a quiet 2-core machine
def test_scenes_name_either_bowl_where_it_is_say_where_it_rests_and_a_rerun_renders_only_what_is_missing(
        sim_demos_dir, tmp_path):
    from atlas_vla.data.samples import LiberoSamples
    from atlas_vla.data.sources import load_libero
    from atlas_vla.data.spec import SampleSpec
    from atlas_vla.eval.libero_sim import make_env, start_episode, task_info
    from atlas_vla.scenes.scene import Scene

    source = lerobot_subset(sim_demos_dir, tmp_path / "demos", [0])  # libero_spatial task 0
    output = tmp_path / "scenes"
    done = _render(source, output, "--num-scenes", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "libero_spatial/0: 4 of 4 scenes written" in done.stdout

    episodes = [json.loads(line) for line in (output / "meta" / "episodes.jsonl").read_text().splitlines()]
    scenes = [row["scene"] for row in episodes]
    assert [row["length"] for row in episodes] == [1] * 4
    # states 0, 1 in turn; the task's own bowl, then (its twin as the goal) the other one
    assert [s["initial_state"] for s in scenes] == [0, 1, 0, 1]
    env = make_env(task_info("libero_spatial", 0)[1], 128)
    try:
        start_episode(env, task_info("libero_spatial", 0)[2][0])
        scene = Scene(env)
        own = scene.goal().obj
        assert [s["goal_object"] for s in scenes[:2]] == [own, own]
        assert scenes[2]["goal_object"] == scenes[3]["goal_object"] != own
        assert scene.category(scenes[2]["goal_object"]) == scene.category(own)
    finally:
        env.close()

    data = load_libero(str(output))
    assert np.isnan(np.asarray(data["action"], np.float32)).all()
    positions = np.asarray(data["object_positions"], np.float32)
    for row, s in zip(positions, scenes):  # where the layout's settled pose put the goal's object
        assert np.allclose(row[:3], s["layout"]["settled"][s["goal_object"]][:3], atol=1e-5)
        assert np.isfinite(row).all() and 0.8 < row[2] < 1.0 and 0.8 < row[5] < 1.0  # both on the table
    instructions = list(data["instruction"])
    assert all(text.startswith("pick up the black bowl ") and text.endswith(" place it on the plate")
               for text in instructions), instructions
    images = np.stack([np.asarray(image) for image in data["observation.images.agentview"]])
    assert images.shape == (4, 128, 128, 3) and len({image.tobytes() for image in images}) == 4
    samples = LiberoSamples(data, SampleSpec(image_size=126, action_horizon=8))
    assert all(samples[i]["actions_is_pad"].all() for i in range(4))  # they teach no action

    # a rerun renders only the missing scene, to the same frame; other settings are refused
    work = output.with_name("scenes.scenes")
    missing = work / "libero_spatial-0" / "scene-000002.npz"
    missing.unlink()
    before = images[2]
    done = _render(source, output, "--num-scenes", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3/4" in done.stderr.replace("\r", "\n")  # the progress bar started with three scenes done
    again = np.asarray(load_libero(str(output))["observation.images.agentview"][2])
    assert np.abs(again.astype(int) - before.astype(int)).mean() < 1.0
    refused = _render(source, output, "--num-scenes", "4", "--seed", "3")
    assert refused.returncode != 0 and "rendered with other settings (seed: [0] there, [3] now)" in refused.stderr
    # before anything is written: a state the task does not have; a work folder render-scenes did not write
    refused = _render(source, tmp_path / "more", "--num-scenes", "4", "--initial-states", "0,50")
    assert refused.returncode != 0 and ("--initial-states [50]: libero_spatial task 0 has official initial states "
                                        "0-49") in refused.stderr
    assert not (tmp_path / "more.scenes").exists()
    (tmp_path / "mine.scenes").mkdir()
    (tmp_path / "mine.scenes" / "notes.txt").write_text("mine")
    refused = _render(source, tmp_path / "mine", "--num-scenes", "4", "--fresh")
    assert refused.returncode != 0 and "holds no settings.json: render-scenes did not write it" in refused.stderr
    assert (tmp_path / "mine.scenes" / "notes.txt").read_text() == "mine"
