"""The model card of a saved policy: what it is, what it was trained on, and how well it does in closed loop.

`write_model_card` writes `README.md` into a policy folder: Hugging Face Hub metadata (`huggingface_hub.
ModelCardData`: library, `pipeline_tag: robotics`, license, tags, the data sources that are Hub datasets, the
frozen encoders as base models, and a `model-index` with one result per evaluated suite: success rate,
episodes, successes, 95% Wilson interval, initial states, seed), then the training steps and data, the W&B run
and artifact, the results table and a usage snippet. Everything comes from files: the policy folder's
`config.json`, the training run beside it (`config.yaml`, `train_summary.json` or a checkpoint's
`training_state.json`) and `eval-libero` results files. A policy with no evaluation says so; no number is made up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from atlas_vla.config import TrainConfig, TrainingConfig, load_config
from atlas_vla.data.normalization import NormStats
from atlas_vla.eval import libero_sim
from atlas_vla.eval.intervals import format_rate
from atlas_vla.files import read_json, write_text_atomic
from atlas_vla.hub import is_hub_repo, is_local, public_name
from atlas_vla.models.config import MINILM
from atlas_vla.models.pretrained import STATS_NAME, policy_hash, read_policy_config
from atlas_vla.training.artifacts import policy_artifact_name
from atlas_vla.training.checkpointing import STATE_NAME
from atlas_vla.training.run_folder import POLICY_VERSIONS_FILE, RUN_ID_FILE, SUMMARY_NAME, policy_versions

CARD_NAME = "README.md"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the packaged `minilm` folder is
TAGS = ["robotics", "vision-language-action", "libero", "atlas-vla"]


def write_model_card(policy_dir: str | Path, results: Sequence[str | Path] = (), *, license: str | None = None,
                     repo_id: str | None = None) -> Path:
    """Write `README.md` into the saved policy `policy_dir` from it, its training run and `results` (eval-libero
    results files); returns the card's path. `repo_id` is the Hub repo the card's usage snippet loads from (a card
    names no local path: it is written to be published)."""
    folder = Path(policy_dir)
    card = model_card(folder, results, license=license, repo_id=repo_id)
    return write_text_atomic(folder / CARD_NAME, card)


def model_card(folder: Path, results: Sequence[str | Path] = (), *, license: str | None = None,
               repo_id: str | None = None) -> str:
    """The text of the card `write_model_card` writes. `license` None: the backbone's terms (`default_license`)."""
    from huggingface_hub import ModelCard, ModelCardData

    saved = read_policy_config(folder)
    training = _training_run(folder)
    suites = [row for path in results for row in suite_results(path, folder)]
    name = repo_id.split("/")[-1] if repo_id else _default_name(folder, training.get("config"))
    data = ModelCardData(
        model_name=name, library_name="atlas-vla", pipeline_tag="robotics", license=license or default_license(saved),
        tags=TAGS,
        datasets=_hub_datasets(training.get("config")) or None, base_model=_base_models(saved) or None,
        eval_results=[_eval_result(row) for row in suites] or None)
    body = "\n\n".join(part for part in (
        f"# {name}", _summary(saved), _training_section(training, NormStats.load(folder / STATS_NAME)),
        _results_section(suites),
        _usage_section(repo_id or "path/to/this/folder")) if part)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n"))


def suite_results(path: str | Path, folder: Path | None = None) -> list[dict[str, Any]]:
    """One row per suite of an `eval-libero` results file (`libero_sim.evaluation_record`, with the tasks and the
    file). A file that records evaluating another policy than the one in `folder` is refused."""
    results = libero_sim.load_results(path)
    settings = results.get("settings") or {}
    recorded = settings.get("policy_identity")
    if folder is not None and recorded and recorded.startswith("sha256 ") and recorded != f"sha256 {policy_hash(folder)}":
        raise ValueError(f"{path} evaluated another policy ({recorded[:23]}...) than the one in {folder} "
                         f"(sha256 {policy_hash(folder)[:16]}...)")
    return [{**libero_sim.evaluation_record(suite, row, settings), "tasks": sorted(int(t) for t in row.get("tasks", {})),
             "file": str(path)} for suite, row in results["suites"].items()]


def _eval_result(row: dict[str, Any]) -> Any:
    from huggingface_hub import EvalResult

    states = row["initial_states"]
    return EvalResult(
        task_type="robotics", task_name="closed-loop manipulation", dataset_type="libero", dataset_name=row["suite"],
        dataset_config=row["suite"],
        dataset_args={"initial_states": _ranges(states) if states else None, "seed": row["seed"],
                      "tasks": row["tasks"]},
        metric_type="success_rate", metric_name="success rate", metric_value=row["success_rate"],
        metric_args={"episodes": row["episodes"], "successes": row["successes"],
                     "interval_95": [round(v, 4) for v in row["interval_95"]]})


def _ranges(values: Sequence[int]) -> str:
    """`30-49` or `0-4,10`: a list of initial states as eval-libero's `--initial-states` takes it."""
    values, parts, start = sorted(values), [], None
    for index, value in enumerate(values):
        start = value if start is None else start
        if index + 1 == len(values) or values[index + 1] != value + 1:
            parts.append(f"{start}-{value}" if value != start else str(value))
            start = None
    return ",".join(parts)


def default_license(saved: dict[str, Any]) -> str:
    """The licence the policy's weights can carry by default: `apache-2.0` (atlas-vla's) when the VGGT was not
    initialised from pretrained weights, `cc-by-nc-4.0` on the original VGGT-1B (released for non-commercial use
    only), and `other` on any other pretrained VGGT (a local copy, `facebook/VGGT-1B-Commercial` and its own
    terms, ...: its terms are not known here, so none is claimed); `--license` overrides it."""
    pretrained = saved.get("backbones", {}).get("vggt", {}).get("pretrained")
    if not pretrained:
        return "apache-2.0"
    return "cc-by-nc-4.0" if pretrained == "facebook/VGGT-1B" else "other"


def _training_run(folder: Path) -> dict[str, Any]:
    """What is known of the run that trained the policy in `folder`: its config (`config.yaml` in the folder, as a
    W&B version holds it, or beside it, in a run's or a checkpoint's folder), its steps, its W&B run id and the
    policy versions the run logged (`run_folder.policy_versions`)."""
    found: dict[str, Any] = {}
    for place in (folder, folder.parent):
        if "config" not in found and (place / "config.yaml").is_file():
            found["config"] = load_config(place / "config.yaml")
        if (place / SUMMARY_NAME).is_file():
            summary = read_json(place / SUMMARY_NAME)
            found.setdefault("steps", summary.get("global_step"))
            found.setdefault("run_id", summary.get("wandb_run_id"))
        if (place / STATE_NAME).is_file():
            state = read_json(place / STATE_NAME)
            found.setdefault("steps", state.get("global_step"))
            found.setdefault("run_id", state.get("wandb_run_id"))
        if (place / RUN_ID_FILE).is_file():
            found.setdefault("run_id", (place / RUN_ID_FILE).read_text().strip())
    for run_dir in (folder.parent, *folder.parents[2:3]):  # a run's final/, or its checkpoints/checkpoint-N/policy
        if (run_dir / POLICY_VERSIONS_FILE).is_file():
            found["versions"] = policy_versions(run_dir)
    return found


def _default_name(folder: Path, config: TrainConfig | None) -> str:
    """The run's name for a run's `final/` or a checkpoint's `policy/` (their own names say nothing), else the
    folder's."""
    folder = folder.resolve()
    if folder.name in ("final", "policy") and config is not None:
        return Path(config.training.output_dir).name
    return folder.name


def _hub_datasets(config: TrainConfig | None) -> list[str]:
    """The training sources that are Hub datasets (local folders have no public name)."""
    if config is None:
        return []
    return [source for source in config.data.sources if is_hub_repo(source)]


def _base_models(saved: dict[str, Any]) -> list[str]:
    """The frozen encoders that are Hub models: the VGGT backbone and the text encoder."""
    backbones = saved.get("backbones", {})
    names = [backbones.get("vggt", {}).get("pretrained"), backbones.get("language", {}).get("model_name_or_path")]
    names = [MINILM_HUB_ID if name == MINILM else name for name in names]
    return [name for name in names if name and is_hub_repo(name)]


def _summary(saved: dict[str, Any]) -> str:
    policy = saved.get("policy", {})
    backbones = saved.get("backbones", {})
    vggt = backbones.get("vggt", {})
    language = backbones.get("language", {})
    vggt_name = _public_name(vggt.get("pretrained")) or f"a randomly initialised VGGT (seed {vggt.get('init_seed')})"
    text_name = language.get("model_name_or_path")
    text_name = MINILM_HUB_ID if text_name == MINILM else _public_name(text_name)
    return (f"An Atlas vision-language-action policy for LIBERO, trained with atlas-vla: a frozen "
            f"VGGT geometry backbone ({vggt_name}, weights hash `{vggt.get('weights_hash')}`) sees the cameras, a "
            f"frozen text encoder ({text_name}, weights hash `{language.get('weights_hash')}`) reads the "
            f"instruction, and a trainable fusion module and action head predict chunks of "
            f"{policy.get('action_horizon', '?')} 7-D actions (end-effector pose delta and gripper). Only the "
            f"trainable weights are in `model.safetensors`; the frozen encoders are loaded from their ids and "
            f"checked against these hashes. Normalisation statistics: fingerprint "
            f"`{saved.get('norm_stats_fingerprint')}`. atlas-vla {saved.get('atlas_vla_version')}.")


def _training_section(training: dict[str, Any], stats: NormStats) -> str:
    """Steps, data and the W&B run. Local data sources are named by their folder's name, not their path (a card
    is public), with the number and fingerprint of the frames the policy was trained on."""
    sources = stats.per_source()
    config: TrainConfig | None = training.get("config")
    names = config.data.sources if config is not None else [source["source"] for source in sources]
    data = [f"{_source_label(name)}: {source['num_frames']} frames, fingerprint `{source['fingerprint']}`"
            for name, source in zip(names, sources)]
    if config is None:
        return "\n".join(["## Training", "", *[f"- data: {line}" for line in data],
                          "- the training run's `config.yaml` was not found beside this policy"])
    steps = training.get("steps")
    lines = ["## Training", "",
             f"- steps: {steps if steps is not None else f'{config.training.max_train_steps} configured'} optimizer "
             f"updates, batch {config.training.train_batch_size} per process, {_rates(config.training)}, seed "
             f"{config.training.seed}",
             *[f"- data: {line}" for line in data]]
    run_id = training.get("run_id")
    if run_id and config.trackers and "wandb" in config.trackers:
        where = f"{config.wandb.entity}/{config.wandb.project}" if config.wandb.entity else config.wandb.project
        lines.append(f"- W&B run: `{run_id}` in `{where}`"
                     + (f" (https://wandb.ai/{where}/runs/{run_id})" if config.wandb.entity else ""))
        if steps is not None and steps in training.get("versions", {}):  # the run logged these very weights
            entity = config.wandb.entity or "ENTITY"
            lines.append(f"- W&B artifact: `{policy_artifact_name(run_id)}` (`wandb.log_model: {config.wandb.log_model}`),"
                         f" once the run is synced: `--policy wandb:{entity}/{config.wandb.project}/"
                         f"{policy_artifact_name(run_id)}:step-{steps}`")
    return "\n".join(lines)


def _rates(training: TrainingConfig) -> str:
    """'learning rate 0.0001 (cosine, 500 warm-up updates)', and the locating parameters' when they have their own."""
    group = training.locate_group()
    text = f"learning rate {training.learning_rate} ({_schedule_text(training.lr_scheduler, training)})"
    return text if group is None else (f"{text}; the locate read-out and the pixel stem {group[0]} "
                                       f"({_schedule_text(group[1], training)})")


def _schedule_text(name: str, training: TrainingConfig) -> str:
    """A schedule's name, with its warm-up where it has one (transformers' constant schedule takes none)."""
    if name == "constant":
        return name
    return f"{name}, {training.lr_warmup_steps} warm-up updates"


def _public_name(name: str | None) -> str | None:
    """A Hub id as it is; a local file or folder by its name only (a card is public)."""
    if not name or not is_local(name):
        return name
    return f"a local copy named `{public_name(name)}`"


def _source_label(name: str | None) -> str:
    if not name:
        return "data of unknown origin"
    if not is_local(name):
        return f"`{name}`"
    return f"`{public_name(name)}` (a local folder)"


def _results_section(suites: Sequence[dict[str, Any]]) -> str:
    if not suites:
        return ("## Results\n\nThis policy has not been evaluated in closed loop: no `eval-libero` results were given "
                "(`atlas-vla model-card POLICY --eval RESULTS.json`), so this card reports none.")
    rows = ["## Results", "", "Closed-loop success in the LIBERO simulator (95% Wilson intervals):", "",
            "| suite | success | initial states | seed |", "|---|---|---|---|"]
    for row in suites:
        states = _ranges(row["initial_states"]) if row["initial_states"] else "?"
        seed = row["seed"] if row["seed"] is not None else "?"
        rows.append(f"| {row['suite']} | {format_rate(row['successes'], row['episodes'])} | {states} | {seed} |")
    return "\n".join(rows)


def _usage_section(where: str) -> str:
    return "\n".join([
        "## Use it", "", "```python", "from atlas_vla.models.policy import AtlasPolicy", "",
        f'policy = AtlasPolicy.from_pretrained("{where}")',
        "actions = policy.predict_action(observation)  # (action_horizon, 7) in LIBERO units", "```", "",
        "Serve it to a robot or a simulator (openpi's websocket protocol):", "", "```bash",
        f"atlas-vla serve --policy {where}", "```"])
