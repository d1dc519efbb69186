"""The model card of a saved policy, parsed back with `huggingface_hub.ModelCard.load`: Hub metadata, a
`model-index` whose results are the eval-libero results files' by value (none when there is no evaluation),
the training run's steps and data without local paths, and a folder that still loads with `from_pretrained`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import HAS_SIM, synthetic_dataset, tiny_policy_config
from huggingface_hub import ModelCard

from atlas_vla.cli import main as cli
from atlas_vla.config import config_from_args, save_config
from atlas_vla.data.normalization import compute_norm_stats
from atlas_vla.data.sources import load_libero
from atlas_vla.eval import failures
from atlas_vla.eval import libero_sim as sim
from atlas_vla.models.policy import AtlasPolicy
from atlas_vla.training.model_card import MINILM_HUB_ID, default_license
from atlas_vla.training.run_folder import record_policy_version

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run's folder as training leaves it: config.yaml (a Hub dataset and a local folder as sources),
    train_summary.json, wandb_run_id.txt, and the policy in final/."""
    root = tmp_path_factory.mktemp("card")
    data = synthetic_dataset(root, num_episodes=4)
    out = root / "libero-spatial-run"
    config = config_from_args(["--config", str(REPO / "configs" / "demo.yaml"), "--output_dir", str(out),
                               "--max_train_steps", "400", "--wandb.enabled", "true", "--wandb.entity", "my-team",
                               "--data.source", str(data)])
    out.mkdir()
    save_config(config, out / "config.yaml")
    (out / "train_summary.json").write_text(json.dumps({"global_step": 380, "wandb_run_id": "3x7k2m9q"}))
    record_policy_version(out, 380, ["step-380", "final"])  # the run logged its final policy to W&B
    policy = AtlasPolicy(tiny_policy_config(), compute_norm_stats(load_libero(str(data))))
    policy.save_pretrained(out / "final")
    return out


def results_file(path: Path, suite: str, outcomes: list[bool], states: list[int], seed: int = 7) -> Path:
    """An eval-libero results file written by its own writer, for `outcomes` of task 0 at `states`."""
    episodes = [sim.EpisodeResult(suite, 0, state, "put the bowl on the plate", ok, 100, 1.0,
                                  failure=None if ok else failures.NO_GRASP) for ok, state in zip(outcomes, states)]
    return sim.save_results(path, suite, sim.summarize(episodes),
                            {"eval": {"suite": suite, "initial_states": states, "seed": seed}})


def test_the_card_holds_the_hub_metadata_and_one_result_per_suite_by_value(run_folder, tmp_path):
    base = results_file(tmp_path / "base.json", "libero_spatial", [True] * 18 + [False] * 2, list(range(30, 50)))
    swap = results_file(tmp_path / "swap.json", "libero_spatial_swap", [True] * 3 + [False] * 17, list(range(30, 50)))
    assert cli(["model-card", str(run_folder / "final"), "--eval", str(base), str(swap), "--license", "mit"]) == 0
    card = ModelCard.load(run_folder / "final" / "README.md")
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("atlas-vla", "robotics", "mit")
    assert "robotics" in data.tags and data.base_model == [MINILM_HUB_ID]  # the random tiny VGGT is no Hub model
    assert data.datasets is None  # a local folder has no public name
    assert data.model_name == "libero-spatial-run"
    results = {result.dataset_name: result for result in data.eval_results}
    assert sorted(results) == ["libero_spatial", "libero_spatial_swap"]
    for name, path in (("libero_spatial", base), ("libero_spatial_swap", swap)):
        written = json.loads(path.read_text())
        result = results[name]
        assert result.metric_type == "success_rate" and result.metric_value == written["success_rate"]
        assert result.metric_args == {"episodes": 20, "successes": written["successes"],
                                      "interval_95": [round(v, 4) for v in written["interval_95"]]}
        assert result.dataset_args == {"initial_states": "30-49", "seed": 7, "tasks": [0]}
    assert results["libero_spatial"].metric_value == 0.9 and results["libero_spatial_swap"].metric_value == 0.15
    text = card.text
    assert "| libero_spatial | 18/20 90.0% [70-97%] | 30-49 | 7 |" in text
    assert "- steps: 380 optimizer updates, batch 32 per process, learning rate 0.001 (cosine, 20 warm-up updates), " \
        "seed" in text and "`synthetic-4` (a local folder)" in text
    assert str(run_folder.parent) not in card.content  # no local path leaves the machine in a card
    assert "- W&B run: `3x7k2m9q` in `my-team/atlas-vla` (https://wandb.ai/my-team/atlas-vla/runs/3x7k2m9q)" in text
    assert "`--policy wandb:my-team/atlas-vla/atlas-policy-3x7k2m9q:step-380`" in text
    # the folder with its card is still a policy
    AtlasPolicy.from_pretrained(run_folder / "final")


def test_a_policy_without_an_evaluation_says_so_and_names_hub_datasets(run_folder, tmp_path):
    folder = tmp_path / "policy"
    AtlasPolicy.from_pretrained(run_folder / "final").save_pretrained(folder)
    config = config_from_args(["--config", str(run_folder / "config.yaml"), "--data.source",
                               "physical-intelligence/libero", "--wandb.enabled", "false", "--model.locate_weight", "1",
                               "--training.locate_learning_rate", "0.002",
                               "--training.locate_lr_scheduler", "constant"])
    save_config(config, folder / "config.yaml")  # the layout of a W&B policy version
    assert cli(["model-card", str(folder)]) == 0
    card = ModelCard.load(folder / "README.md")
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "This policy has not been evaluated in closed loop" in card.text
    assert card.data.datasets == ["physical-intelligence/libero"]
    assert "W&B run" not in card.text and "- steps: 400 configured optimizer updates" in card.text
    assert "learning rate 0.001 (cosine, 20 warm-up updates); the locate read-out and the pixel stem 0.002 " \
        "(constant)" in card.text  # transformers' constant schedule has no warm-up


def test_results_of_another_policy_are_refused_and_local_paths_stay_out(run_folder, tmp_path, capsys):
    from atlas_vla.models.pretrained import policy_hash

    other = results_file(tmp_path / "other.json", "libero_spatial", [True], [30])
    written = json.loads(other.read_text())
    written["settings"]["policy_identity"] = "sha256 " + "0" * 64  # what eval-libero records of what it ran
    other.write_text(json.dumps(written))
    assert cli(["model-card", str(run_folder / "final"), "--eval", str(other)]) == 2
    assert capsys.readouterr().err == (
        f"atlas-vla model-card: error: {other} evaluated another policy (sha256 0000000000000000...) than the one in "
        f"{run_folder / 'final'} (sha256 {policy_hash(run_folder / 'final')[:16]}...)\n")
    written["settings"]["policy_identity"] = f"sha256 {policy_hash(run_folder / 'final')}"
    other.write_text(json.dumps(written))
    assert cli(["model-card", str(run_folder / "final"), "--eval", str(other)]) == 0
    card = ModelCard.load(run_folder / "final" / "README.md")
    assert card.data.license == "apache-2.0"  # a random VGGT: atlas-vla's own licence (VGGT-1B's is non-commercial)
    # a backbone read from a local file is named by its file name only
    folder = tmp_path / "local-backbone"
    AtlasPolicy.from_pretrained(run_folder / "final").save_pretrained(
        folder, references={"vggt": {"pretrained": str(tmp_path / "weights" / "vggt.safetensors"),
                                     "weights_hash": "abc"},
                            "language": {"model_name_or_path": "minilm", "weights_hash": "def"}})
    assert cli(["model-card", str(folder)]) == 0
    text = (folder / "README.md").read_text()
    assert "a local copy named `vggt.safetensors`" in text and str(tmp_path) not in text
    assert ModelCard.load(folder / "README.md").data.license == "other"  # its terms are not known here


@pytest.mark.parametrize("pretrained,license", [
    (None, "apache-2.0"), ("facebook/VGGT-1B", "cc-by-nc-4.0"), ("facebook/VGGT-1B-Commercial", "other"),
    ("/weights/vggt-1b.safetensors", "other")])
def test_the_default_licence_claims_only_what_the_backbone_allows(pretrained, license):
    assert default_license({"backbones": {"vggt": {"pretrained": pretrained}}}) == license


def test_a_run_file_that_is_not_json_is_named(run_folder, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_folder, copy)
    (copy / "train_summary.json").write_text("")
    assert cli(["model-card", str(copy / "final")]) == 2
    assert capsys.readouterr().err.startswith(f"atlas-vla model-card: error: {copy / 'train_summary.json'}: not valid JSON")


def test_bad_inputs_are_one_line_and_write_nothing(run_folder, tmp_path, capsys):
    assert cli(["model-card", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"atlas-vla model-card: error: {tmp_path} is not an Atlas policy: config.json is missing\n"
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    before = (run_folder / "final" / "README.md").read_bytes() if (run_folder / "final" / "README.md").exists() else None
    assert cli(["model-card", str(run_folder / "final"), "--eval", str(bad)]) == 2
    assert "not an eval-libero results file" in capsys.readouterr().err
    after = (run_folder / "final" / "README.md").read_bytes() if (run_folder / "final" / "README.md").exists() else None
    assert after == before


@pytest.mark.skipif(not HAS_SIM, reason="the LIBERO simulator ([sim] extra) is not installed")
@pytest.mark.sim
@pytest.mark.slow
def test_the_card_reads_a_real_eval_libero_results_file(run_folder, tmp_path):
    output = tmp_path / "results.json"
    assert cli(["eval-libero", "--policy", str(run_folder / "final"), "--suite", "libero_spatial", "--tasks", "0",
                "--initial-states", "30,31", "--max-episode-steps", "12", "--camera-size", "128", "--num-workers",
                "1", "--seed", "3", "--eval.videos", "false", "--output", str(output)]) == 0
    written = json.loads(output.read_text())
    assert cli(["model-card", str(run_folder / "final"), "--eval", str(output)]) == 0
    [result] = ModelCard.load(run_folder / "final" / "README.md").data.eval_results
    assert (result.dataset_name, result.metric_value) == ("libero_spatial", written["success_rate"])
    assert result.metric_args["episodes"] == 2 and result.metric_args["successes"] == written["successes"]
    assert result.dataset_args == {"initial_states": "30-31", "seed": 3, "tasks": [0]}
