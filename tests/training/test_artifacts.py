"""A run's policy as one versioned W&B artifact, read back from the offline run's own records: a version per
logged checkpoint holding the exported policy byte for byte, its aliases and metadata by value; none when
asked for none; and a run whose artifacts cannot be staged finishes with every checkpoint."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import offline_environment, synthetic_dataset, tiny_args
from wandb_records import find_run_files, read_run

import atlas_vla
from atlas_vla.data.normalization import NormStats
from atlas_vla.models.policy import AtlasPolicy
from atlas_vla.training.run_folder import policy_versions

REPO = Path(__file__).resolve().parents[2]
POLICY_FILES = ("config.json", "model.safetensors", "norm_stats.json")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return synthetic_dataset(tmp_path_factory.mktemp("artifact-data"), num_episodes=8)


def train(out: Path, data_dir: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    """A 6-update run (checkpoints at 2, 4, 6, the newest 2 kept; validation at 3 and 6) logging to offline W&B."""
    result = subprocess.run([sys.executable, "train.py", *tiny_args(data_dir, out, "--report_to", "wandb", *extra)],
                            cwd=REPO, env=offline_environment(**{"WANDB_DATA_DIR": str(out.parent / "wandb-data"), **env}),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def md5_base64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_log_model_all_logs_one_artifact_with_a_version_per_checkpoint(tmp_path, data_dir, observation_file):
    out = tmp_path / "run"
    train(out, data_dir, "--wandb.log_model", "all")
    [run_file] = find_run_files(out)
    logged = read_run(run_file)
    policies = [artifact for artifact in logged.artifacts if artifact.type == "model"]
    assert {artifact.name for artifact in policies} == {f"atlas-policy-{logged.run_id}"}
    assert [artifact.metadata["step"] for artifact in policies] == [2, 4, 6]
    assert len({artifact.digest for artifact in policies}) == 3  # other weights: three versions

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validations = {row["step"]: {k: v for k, v in row.items() if k.startswith("val/")}
                   for row in rows if "val/pose_l1_error" in row}
    assert sorted(validations) == [3, 6]
    # `best` follows val/pose_l1_error (no simulator evaluation): step 2 has no validation yet, step 4 is the
    # first with one, step 6 is best only if its error is lower than step 3's
    improved = validations[6]["val/pose_l1_error"] < validations[3]["val/pose_l1_error"]
    assert [artifact.aliases for artifact in policies] == [
        ["latest", "step-2"], ["best", "latest", "step-4"],
        sorted(["final", "latest", "step-6"] + (["best"] if improved else []))]
    assert [artifact.metadata["validation"] for artifact in policies] == [{}, validations[3], validations[6]]
    assert [artifact.metadata["validation_step"] for artifact in policies] == [None, 3, 6]  # when it was measured
    # the run folder says which steps have a version (eval-watch attaches there, a model card names it)
    assert policy_versions(out) == {2: ["step-2"], 4: ["step-4", "best"],
                                    6: ["step-6", "final"] + (["best"] if improved else [])}

    stats = NormStats.load(out / "norm_stats.json")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    final = out / "final"
    for artifact in policies:
        metadata = artifact.metadata
        assert metadata["metric"] == "val/pose_l1_error" and metadata["evaluations"] == []
        assert metadata["metric_suite"] == "libero_spatial"  # the suite eval/success_rate would mean
        assert metadata["data"] == {"sources": [{"source": data_dir.name, "num_frames": stats.num_frames,
                                                 "fingerprint": stats.fingerprint}],
                                    "fingerprint": stats.fingerprint, "num_frames": stats.num_frames}
        assert metadata["backbones"] == json.loads((final / "config.json").read_text())["backbones"]
        assert metadata["atlas_vla_version"] == atlas_vla.__version__ and metadata["git"]["commit"] == commit
        assert set(artifact.files) == {*POLICY_FILES, "config.yaml"}
        # staged copies outlive the checkpoints retention deleted (checkpoint-2): `wandb sync` uploads them
        for name, (digest, size) in artifact.files.items():
            staged = Path(artifact.staged[name])
            assert md5_base64(staged) == digest and staged.stat().st_size == size
            assert metadata["files"][name] == sha256(staged)
    assert not (out / "checkpoints" / "checkpoint-2").exists()
    # the last version is the exported policy, byte for byte, with the run's training config
    last = policies[-1]
    for name in POLICY_FILES:
        assert last.files[name] == (md5_base64(final / name), (final / name).stat().st_size)
        assert last.metadata["files"][name] == sha256(final / name)
    assert last.metadata["files"]["config.yaml"] == sha256(out / "checkpoints" / "checkpoint-6" / "config.yaml")
    # a version loads on its own: its files, as a download of it holds them, are a policy
    version = tmp_path / "version"
    version.mkdir()
    for name, staged in last.staged.items():
        (version / name).write_bytes(Path(staged).read_bytes())
    observation = dict(np.load(observation_file))
    np.testing.assert_array_equal(AtlasPolicy.from_pretrained(version).predict_action(observation),
                                  AtlasPolicy.from_pretrained(final).predict_action(observation))


def test_log_model_none_logs_no_artifact_and_final_logs_one_version(tmp_path, data_dir):
    none, final = tmp_path / "none", tmp_path / "final"
    train(none, data_dir, "--wandb.log_model", "none")
    assert [a for a in read_run(find_run_files(none)[0]).artifacts if a.type in ("model", "checkpoint")] == []
    train(final, data_dir)  # the default: the last update's policy only
    logged = read_run(find_run_files(final)[0])
    [policy] = [a for a in logged.artifacts if a.type == "model"]
    assert policy.aliases == ["final", "latest", "step-6"] and policy.metadata["step"] == 6
    assert policy_versions(final) == {6: ["step-6", "final"]} and policy_versions(none) == {}
    from atlas_vla.cli import main as cli

    for folder, named in ((final / "final", True), (final / "checkpoints" / "checkpoint-4" / "policy", False)):
        assert cli(["model-card", str(folder)]) == 0  # only a version the run logged is named
        card = (folder / "README.md").read_text()
        assert (f"atlas-policy-{logged.run_id}:step-6`" in card) is named and "step-4`" not in card


def test_artifacts_that_cannot_be_staged_are_one_warning_and_the_run_finishes(tmp_path, data_dir):
    out = tmp_path / "run"
    blocked = tmp_path / "not-a-folder"  # W&B cannot create its staging folder under a file
    blocked.write_text("")
    result = train(out, data_dir, "--logging.log_media", "false", WANDB_DATA_DIR=str(blocked))
    log = result.stdout + result.stderr
    warnings = [line for line in log.splitlines() if "W&B artifact" in line]
    assert len(warnings) == 1, log[-3000:]
    assert "W&B artifact atlas-policy-" in warnings[0] and "(step-6, final) was not logged, the local checkpoint " \
           "is intact: PermissionError: Unable to write staging files to" in warnings[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in (out / "checkpoints" / "checkpoint-6" / "policy").iterdir()) == sorted(POLICY_FILES)
    assert (out / "final" / "model.safetensors").is_file()
    assert policy_versions(out) == {}  # nothing for eval-watch to attach to


def test_a_logged_checkpoint_continues_the_same_run_elsewhere(tmp_path, data_dir):
    """`wandb.log_checkpoints`: the step-4 checkpoint version, rebuilt from the files the offline run staged (what a
    download of it holds), passes the hash check and continues the run in another folder: the same W&B run, steps
    5 and 6, and the weights of a run that was never interrupted."""
    from safetensors.torch import load_file

    from atlas_vla.wandb_artifacts import check_files

    straight, logged = tmp_path / "straight", tmp_path / "logged"
    train(straight, data_dir, "--wandb.log_model", "none")
    train(logged, data_dir, "--wandb.log_checkpoints", "true", "--wandb.log_model", "none")
    run = read_run(find_run_files(logged)[0])
    checkpoints = [a for a in run.artifacts if a.type == "checkpoint"]
    assert {a.name for a in checkpoints} == {f"atlas-checkpoint-{run.run_id}"}
    assert [a.aliases for a in checkpoints] == [["latest", f"step-{step}"] for step in (2, 4, 6)]
    [version] = [a for a in checkpoints if a.metadata["step"] == 4]
    assert {"training_state.json", "optimizer.bin", "model.safetensors", "policy/model.safetensors"} <= set(version.files)
    downloaded = tmp_path / "elsewhere" / "download"
    for name, staged in version.staged.items():
        (downloaded / name).parent.mkdir(parents=True, exist_ok=True)
        (downloaded / name).write_bytes(Path(staged).read_bytes())
    check_files(downloaded, version.metadata["files"], "the step-4 checkpoint")
    resumed = tmp_path / "elsewhere" / "run"
    train(resumed, data_dir, "--wandb.log_model", "none", "--resume_from_checkpoint", str(downloaded))
    [again] = [read_run(f) for f in find_run_files(resumed)]
    assert again.run_id == run.run_id
    assert [step for step, _ in again.history["train/loss"]] == [5, 6]
    a, b = load_file(str(straight / "final" / "model.safetensors")), load_file(str(resumed / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[key] == b[key]).all() for key in a)
