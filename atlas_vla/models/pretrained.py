"""Saved Atlas policies: the folder format, saving, loading (local or Hub) and uploading.

A saved policy is a folder, loadable without any training code:

- `config.json`: the `PolicyConfig`, the frozen encoders' ids and weight hashes (`backbones`), the
  fingerprint of the normalisation statistics and the atlas-vla version;
- `model.safetensors`: the trainable weights only (the frozen backbone is referenced, not copied);
- `norm_stats.json`: the statistics the policy normalises with.

`PretrainedPolicy` gives `AtlasPolicy` its `save_pretrained` / `from_pretrained` /
`load_trainable_weights` / `push_to_hub`; loading rebuilds the frozen encoders and refuses, with the
reason, weights or statistics that are not the ones the policy was trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, TypeVar

import torch
from safetensors.torch import load_file, save_file

from atlas_vla.data.normalization import NormStats
from atlas_vla.files import StagedFolder, file_hash
from atlas_vla.hub import hub_failure, local_path_or_hub_id
from atlas_vla.models.config import PolicyConfig
from atlas_vla.models.language import LanguageEncoder
from atlas_vla.models.vggt import VGGTAggregator, build_vggt
from atlas_vla.schema import RenamedWarning, from_dict
from atlas_vla.wandb_artifacts import POLICY_ARTIFACT_TYPE, download, is_wandb_reference

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
STATS_NAME = "norm_stats.json"
UPLOADED = (CONFIG_NAME, WEIGHTS_NAME, STATS_NAME, "README.md")  # what push_policy_folder sends to the Hub

Policy = TypeVar("Policy", bound="PretrainedPolicy")


def resolve_policy_folder(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local folder for a saved policy: the folder itself, a W&B artifact (`wandb:ENTITY/PROJECT/NAME:ALIAS`,
    `wandb_artifacts.download`) or a Hub model id, each downloaded once (one that cannot be had, e.g. offline and
    not cached, is a `FileNotFoundError` naming it and the reason)."""
    if is_wandb_reference(name_or_path):
        if revision is not None:
            raise ValueError(f"revision {revision!r} applies to a Hub model id; the W&B reference {name_or_path} "
                             f"names its version by its alias (e.g. :v3, :step-400)")
        return download(str(name_or_path), POLICY_ARTIFACT_TYPE)
    found = local_path_or_hub_id(name_or_path, f"policy folder not found: {Path(name_or_path).expanduser()}")
    if isinstance(found, Path):
        if not found.is_dir():
            raise FileNotFoundError(f"policy folder not found: {found} is a file, expected a folder")
        return found
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(found, revision=revision))
    except (OSError, ValueError) as error:  # hub errors: not found, offline and not cached, bad revision
        raise FileNotFoundError(f"policy {found!r} is not a local folder and could not be had from the Hub "
                                f"(revision {revision or 'main'}): {hub_failure(error)}") from error


def read_policy_config(folder: Path) -> dict[str, Any]:
    """`config.json` of a saved policy folder, after checking that the folder holds a whole policy."""
    for name in (CONFIG_NAME, WEIGHTS_NAME, STATS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not an Atlas policy: {name} is missing")
    try:
        return json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder / CONFIG_NAME}: not valid JSON ({error})") from error


def policy_hash(folder: str | os.PathLike) -> str:
    """SHA-256 (hex) over the files that make a saved policy (`config.json`, `model.safetensors`,
    `norm_stats.json`): what an evaluation records of the policy it ran, unchanged by a card written beside them."""
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME, STATS_NAME):
        digest.update(f"{name}:{file_hash(Path(folder) / name)}\n".encode())
    return digest.hexdigest()


class PretrainedPolicy:
    """Saving and loading for `AtlasPolicy` (a mixin: it uses the policy's config, stats and weights)."""

    config: PolicyConfig
    norm_stats: NormStats

    def backbone_references(self) -> dict[str, Any]:  # implemented by the policy
        raise NotImplementedError

    def save_pretrained(self, save_directory: str | os.PathLike, *, references: dict[str, Any] | None = None) -> Path:
        """Write `config.json`, `model.safetensors` (trainable weights only) and `norm_stats.json`.

        The folder is assembled beside the target and swapped in when complete. `references` lets a
        caller that already knows the backbone hashes skip re-hashing them.
        """
        from atlas_vla import __version__

        with StagedFolder(save_directory) as staged:
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(staged.path / WEIGHTS_NAME), metadata={"format": "pt"})
            # the statistics' fingerprint and content hash let loading detect a norm_stats.json swapped in
            # or edited later
            config = {"policy": self.config.to_dict(), "backbones": references or self.backbone_references(),
                      "norm_stats_fingerprint": self.norm_stats.fingerprint,
                      "norm_stats_hash": self.norm_stats.content_hash(), "atlas_vla_version": __version__}
            (staged.path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
            self.norm_stats.save(staged.path / STATS_NAME)
        return Path(save_directory)

    @classmethod
    def from_pretrained(cls: type[Policy], name_or_path: str | os.PathLike, *, revision: str | None = None,
                        norm_stats: NormStats | str | os.PathLike | None = None) -> Policy:
        """Load a saved policy (a folder, a Hub model id at `revision`, or a W&B artifact reference
        `wandb:ENTITY/PROJECT/NAME:ALIAS`), rebuilding and checking its frozen encoders.

        Refuses, with the reason, a backbone or text encoder whose weights hash differs from the one
        recorded at training time, a `norm_stats.json` whose fingerprint or recomputed content hash differs
        from the one recorded in `config.json` (folders saved before those were recorded skip the check),
        and `norm_stats` (if given) that differ from the stored ones.
        """
        folder = resolve_policy_folder(name_or_path, revision=revision)
        saved = read_policy_config(folder)
        with warnings.catch_warnings():  # a policy saved before a key was renamed is not the user's to edit
            warnings.simplefilter("ignore", RenamedWarning)
            config = from_dict(PolicyConfig, saved["policy"], f"{folder / CONFIG_NAME}: policy")
        stats = NormStats.load(folder / STATS_NAME)
        recorded = saved.get("norm_stats_fingerprint")  # absent in folders saved before it was recorded
        if recorded is not None and recorded != stats.fingerprint:
            raise ValueError(f"{folder / STATS_NAME} does not match the statistics the policy was trained with: "
                             f"fingerprint {stats.fingerprint}, expected {recorded} (recorded in "
                             f"{folder / CONFIG_NAME} key 'norm_stats_fingerprint')")
        recorded_hash = saved.get("norm_stats_hash")
        if recorded_hash is not None and recorded_hash != stats.content_hash():
            raise ValueError(f"{folder / STATS_NAME} was changed after the policy was saved: its values hash to "
                             f"{stats.content_hash()}, expected {recorded_hash} (recorded in {folder / CONFIG_NAME} "
                             f"key 'norm_stats_hash'); restore the file the policy was saved with")
        if norm_stats is not None:
            given = norm_stats if isinstance(norm_stats, NormStats) else NormStats.load(norm_stats)
            stats.check_matches(given, what=f"the statistics given for {folder}")
        references = saved.get("backbones", {})
        # a fine-tuned backbone's weights are in model.safetensors: no need to fetch the pretrained ones
        vggt = build_vggt(config) if config.freeze_vggt else VGGTAggregator(config.vggt)
        language = LanguageEncoder(config.language)
        _check_hash("VGGT backbone", references.get("vggt"), vggt.weights_hash() if config.freeze_vggt else None)
        _check_hash("text encoder", references.get("language"), language.weights_hash())
        policy = cls(config, stats, vggt=vggt, language=language)
        load_weights(policy, folder / WEIGHTS_NAME, f"the policy config in {folder / CONFIG_NAME}")
        return policy.eval()

    def load_trainable_weights(self: Policy, name_or_path: str | os.PathLike, *, revision: str | None = None) -> Policy:
        """Start from another saved policy's trainable weights (fine-tuning), keeping this policy's
        statistics. Refuses a policy trained on another backbone or with other shapes."""
        folder = resolve_policy_folder(name_or_path, revision=revision)
        saved = read_policy_config(folder).get("backbones", {})
        mine = self.backbone_references()
        for name, what in (("vggt", "VGGT backbone"), ("language", "text encoder")):
            if name in saved and name in mine:
                _check_hash(what, saved[name], mine[name]["weights_hash"])
        load_weights(self, folder / WEIGHTS_NAME, "this policy's config")
        return self

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None,
                    commit_message: str = "Upload Atlas policy") -> str:
        """Save the policy and upload it to the Hub (`push_policy_folder`)."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "policy")
            return push_policy_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)


def push_policy_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                       commit_message: str = "Upload Atlas policy") -> str:
    """Upload a saved policy folder (`UPLOADED`: the policy's files and its model card `README.md`, if written; not
    results files or a training config, which name local paths) to the Hub model repo `repo_id`, created if needed;
    returns the commit's URL. The same commit deletes the repo's `UPLOADED` files the folder lacks, so a card left by
    an earlier push never describes this policy. The token is used, never written anywhere; a folder that is not a
    whole policy is refused before anything is uploaded, and a failed upload is a `ConnectionError` with the Hub's
    reason."""
    from huggingface_hub import HfApi

    read_policy_config(Path(folder))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 allow_patterns=list(UPLOADED), delete_patterns=list(UPLOADED))
    except Exception as error:  # no network, no login, no write access: the Hub's reason on one line
        raise ConnectionError(f"uploading {folder} to the Hub repo {repo_id} failed: {hub_failure(error)}") from error
    return str(info)


def load_weights(module: torch.nn.Module, path: Path, fits: str) -> None:
    """Load the safetensors file `path` into `module` (every key, every shape), or raise one `ValueError`
    naming the file and what is wrong: unreadable (truncated, corrupt), or keys and shapes that do not fit
    `fits` (e.g. "the policy config in .../config.json")."""
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError for a bad header
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None
    expected = module.state_dict()
    problems = [f"missing {key}" for key in expected if key not in state]
    problems += [f"unexpected {key}" for key in state if key not in expected]
    problems += [f"{key} is {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}"
                 for key in state if key in expected and state[key].shape != expected[key].shape]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ValueError(f"{path} does not fit {fits}: {shown}")
    module.load_state_dict(state, strict=True)


def _check_hash(what: str, reference: Mapping[str, Any] | None, actual: str | None) -> None:
    if reference is None or actual is None:
        return
    if reference.get("weights_hash") != actual:
        raise ValueError(f"the {what} does not match the one this policy was trained with: weights hash {actual} "
                         f"vs {reference.get('weights_hash')} recorded ({reference})")
