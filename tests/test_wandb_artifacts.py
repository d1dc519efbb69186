"""`wandb:ENTITY/PROJECT/NAME:ALIAS` references: parsed or refused with the expected form, kept as they are where
paths are made absolute, and a downloaded copy checked file by file against the hashes its run recorded.

The download itself needs W&B's servers: here it is run up to the point where W&B says it cannot be had."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import wandb
from helpers import offline_environment

from atlas_vla.cli import main as cli
from atlas_vla.config import config_from_args
from atlas_vla.eval.libero_sim import evaluation_record
from atlas_vla.files import file_hashes
from atlas_vla.hub import resolve_local
from atlas_vla.wandb_artifacts import (
    FORM,
    WandbReference,
    cache_root,
    check_files,
    download,
    fetch_version,
    parse_reference,
)


@pytest.mark.parametrize("text,expected", [
    ("wandb:my-team/atlas-vla/atlas-policy-3x7k2m9q:best", WandbReference("my-team", "atlas-vla", "atlas-policy-3x7k2m9q", "best")),
    ("wandb:me/p.1/atlas-checkpoint-abc:step-400", WandbReference("me", "p.1", "atlas-checkpoint-abc", "step-400")),
    ("wandb:a_b/c/d:v3", WandbReference("a_b", "c", "d", "v3")),
])
def test_references_name_entity_project_name_and_alias(text, expected):
    assert parse_reference(text) == expected
    assert str(expected) == text and expected.path == text[len("wandb:"):]


@pytest.mark.parametrize("text", ["wandb:team/project/name", "wandb:project/name:best", "wandb:a/b/c:", "wandb:/b/c:d",
                                  "wandb:a/b/c:d/e", "wandb:a b/c/d:e", "wandb:", "team/project/name:best",
                                  "wandb-team/project/name:best"])
def test_a_malformed_reference_names_the_expected_form(text):
    with pytest.raises(ValueError) as raised:
        parse_reference(text)
    assert str(raised.value) == f"{text!r} is not a W&B artifact reference: expected {FORM}"


def test_references_stay_as_they_are_where_paths_become_absolute():
    reference = "wandb:team/atlas-vla/atlas-checkpoint-abc:latest"
    assert resolve_local(reference) == reference
    config = config_from_args(["--config", "configs/demo.yaml", "--resume_from_checkpoint", reference,
                               "--training.init_from", "wandb:team/atlas-vla/atlas-policy-abc:best"])
    assert config.checkpoint.resume_from_checkpoint == reference
    assert config.training.init_from == "wandb:team/atlas-vla/atlas-policy-abc:best"
    for flag, key in (("--resume_from_checkpoint", "checkpoint.resume_from_checkpoint"),
                      ("--training.init_from", "training.init_from")):
        with pytest.raises(ValueError) as raised:
            config_from_args(["--config", "configs/demo.yaml", flag, "wandb:atlas-policy-abc"])
        assert str(raised.value) == (f"configs/demo.yaml: {key}: 'wandb:atlas-policy-abc' is not a W&B artifact "
                                     f"reference: expected {FORM}")


def test_a_malformed_policy_reference_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli(["predict", "--policy", "wandb:atlas-policy-abc:best", "--observation", str(tmp_path / "o.npz")]) == 2
    err = capsys.readouterr().err
    assert err == (f"atlas-vla predict: error: --policy: 'wandb:atlas-policy-abc:best' is not a W&B artifact "
                   f"reference: expected {FORM}\n")


def test_a_version_w_and_b_cannot_give_is_a_file_not_found_naming_it(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no stored login either
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("ATLAS_VLA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as raised:
        download("wandb:team/atlas-vla/atlas-policy-abc:best", "model")
    message = str(raised.value)
    assert re.fullmatch(r"wandb:team/atlas-vla/atlas-policy-abc:best could not be had from W&B \(a model artifact; "
                        r"needs a network and `wandb login`\): UsageError: [^\n]*API key[^\n]*", message), message
    assert not (tmp_path / "cache").exists()
    with pytest.raises(FileNotFoundError, match=r"^wandb:t/p/atlas-checkpoint-abc:latest could not be had from W&B "
                                                r"\(a checkpoint artifact;"):
        download(WandbReference("t", "p", "atlas-checkpoint-abc", "latest"), "checkpoint")
    with pytest.raises(ValueError, match="is not a W&B artifact reference"):  # refused before W&B is asked
        download("wandb:atlas-policy-abc:best", "model")


def test_the_cache_is_under_atlas_vla_cache_or_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("ATLAS_VLA_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" / "wandb"
    monkeypatch.setenv("ATLAS_VLA_CACHE", "~/elsewhere")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / "elsewhere" / "wandb"
    monkeypatch.delenv("ATLAS_VLA_CACHE")
    assert cache_root() == tmp_path / "home" / ".cache" / "atlas-vla" / "wandb"


@pytest.fixture
def policy_files(tmp_path) -> Path:
    folder = tmp_path / "policy"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(b"\x00\x01" * 100)
    (folder / "sub" / "x.txt").write_text("x")
    return folder


def test_check_files_accepts_the_recorded_files_and_names_every_difference(policy_files, tmp_path):
    recorded = file_hashes(policy_files)
    assert sorted(recorded) == ["config.json", "model.safetensors", "sub/x.txt"]
    assert recorded["sub/x.txt"] == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"  # sha256("x")
    check_files(policy_files, recorded, "the copy")
    (policy_files / "model.safetensors").write_bytes(b"\x00\x02" * 100)
    (policy_files / "extra.bin").write_bytes(b"")
    (policy_files / "sub" / "x.txt").unlink()
    with pytest.raises(ValueError) as raised:
        check_files(policy_files, recorded, "the copy")
    found = file_hashes(policy_files)["model.safetensors"]
    assert str(raised.value) == (
        f"the copy does not match the hashes its training run recorded: sub/x.txt is missing; extra.bin was not "
        f"recorded; model.safetensors has SHA-256 {found[:16]}..., {recorded['model.safetensors'][:16]}... recorded")
    (policy_files / "config.json").unlink()  # a fourth difference: the first three are named
    with pytest.raises(ValueError) as raised:
        check_files(policy_files, recorded, "the copy")
    assert str(raised.value) == ("the copy does not match the hashes its training run recorded: config.json is "
                                 "missing; sub/x.txt is missing; extra.bin was not recorded; and 1 more")


def test_a_cached_version_is_reused_only_while_it_matches_its_hashes(policy_files, tmp_path, caplog):
    artifact = wandb.Artifact("atlas-policy-abc", type="model", metadata={"files": file_hashes(policy_files)})
    cached = tmp_path / "cache" / "digest"
    shutil.copytree(policy_files, cached)
    assert fetch_version(artifact, cached, "wandb:t/p/atlas-policy-abc:best") == cached  # no download needed
    (cached / "config.json").write_text('{"a": 2}')  # damaged: fetched again (this version was never logged)
    with caplog.at_level(logging.WARNING, logger="atlas_vla.wandb_artifacts"), \
            pytest.raises(FileNotFoundError, match=r"^wandb:t/p/atlas-policy-abc:best could not be downloaded from "
                                                   r"W&B: \w+"):
        fetch_version(artifact, cached, "wandb:t/p/atlas-policy-abc:best")
    [warning] = caplog.messages
    assert re.fullmatch(r"the cached copy of wandb:t/p/atlas-policy-abc:best in .*/cache/digest does not match the "
                        r"hashes its training run recorded: config\.json has SHA-256 .*; downloading it again", warning)
    assert (cached / "config.json").read_text() == '{"a": 2}'  # the damaged copy is not replaced by nothing
    unrecorded = wandb.Artifact("atlas-policy-abc", type="model", metadata={})
    with pytest.raises(ValueError) as raised:
        fetch_version(unrecorded, tmp_path / "elsewhere", "the version")
    assert str(raised.value) == "the version has no file hashes in its metadata: it was not logged by atlas-vla's training"


def test_an_evaluation_offline_is_one_warning_and_the_record_holds_the_counts(tmp_path):
    """Attaching results to a version needs W&B's servers: an offline eval run says so in one line and goes on."""
    script = (
        "import logging, sys, wandb\n"
        "from atlas_vla.wandb_artifacts import WandbReference, attach_evaluation\n"
        "logging.basicConfig(format='%(levelname)s %(message)s')\n"
        f"run = wandb.init(project='p', dir={str(tmp_path)!r})\n"
        "attached = attach_evaluation(run, WandbReference('e', 'p', 'atlas-policy-x', 'step-2'), {'suite': 's'})\n"
        "run.finish()\n"
        "sys.exit(0 if attached is False else 1)\n")
    result = subprocess.run([sys.executable, "-c", script], env=offline_environment(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING ")]
    assert warnings == ["WARNING the evaluation was not attached to the W&B artifact wandb:e/p/atlas-policy-x:step-2: "
                        "TypeError: Cannot use artifact when in offline mode."]
    summary = {"episodes": 20, "successes": 18, "success_rate": 0.9, "interval_95": (0.7, 0.97), "tasks": {}}
    settings = {"eval": {"initial_states": [30, 31], "seed": 3}, "policy": "wandb:e/p/atlas-policy-x:best"}
    assert evaluation_record("libero_spatial", summary, settings, "run1") == {
        "suite": "libero_spatial", "episodes": 20, "successes": 18, "success_rate": 0.9, "interval_95": [0.7, 0.97],
        "initial_states": [30, 31], "seed": 3, "eval_run": "run1"}


def test_without_w_and_b_the_copy_a_reference_last_resolved_to_is_used(policy_files, monkeypatch, tmp_path, caplog):
    """A compute node without a network: the version downloaded earlier (on a login node) is used, checked, with a
    warning; a copy damaged since is not."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("ATLAS_VLA_CACHE", str(tmp_path / "cache"))
    reference = "wandb:team/atlas-vla/atlas-policy-abc:best"
    cached = cache_root() / "0123abcd"
    shutil.copytree(policy_files, cached)
    resolved = cache_root() / "resolved" / "team" / "atlas-vla" / "atlas-policy-abc:best.json"
    resolved.parent.mkdir(parents=True)
    resolved.write_text(json.dumps({"digest": "0123abcd", "files": file_hashes(policy_files)}))
    with caplog.at_level(logging.WARNING, logger="atlas_vla.wandb_artifacts"):
        assert download(reference, "model") == cached
    [warning] = caplog.messages
    assert re.fullmatch(r"W&B cannot be reached \(UsageError: .*\): using the copy wandb:team/atlas-vla/"
                        r"atlas-policy-abc:best last resolved to, .*/cache/wandb/0123abcd \(the alias may have moved "
                        r"since\)", warning)
    with pytest.raises(FileNotFoundError, match="could not be had from W&B"):
        download("wandb:team/atlas-vla/atlas-policy-abc:latest", "model")  # never resolved here
    (cached / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="could not be had from W&B"):
        download(reference, "model")


def test_a_revision_with_a_w_and_b_reference_is_refused_before_w_and_b_is_asked():
    from atlas_vla.models.pretrained import resolve_policy_folder

    with pytest.raises(ValueError) as raised:
        resolve_policy_folder("wandb:team/atlas-vla/atlas-policy-abc:best", revision="main")
    assert str(raised.value) == ("revision 'main' applies to a Hub model id; the W&B reference "
                                 "wandb:team/atlas-vla/atlas-policy-abc:best names its version by its alias "
                                 "(e.g. :v3, :step-400)")
