"""The one rule that tells a Hub id from a local path."""

from __future__ import annotations

import pytest

from atlas_vla.hub import hub_failure, is_hub_id, is_hub_repo, local_path_or_hub_id, public_name


@pytest.mark.parametrize("name", ["physical-intelligence/libero", "facebook/VGGT-1B", "org/atlas-libero-v1.5",
                                  "lerobot/libero_spatial_image"])
def test_hub_ids(name):
    assert is_hub_id(name)


@pytest.mark.parametrize("name", ["./org/name", ".cache/name", "/abs/path", "/abs", "~/home", "~user/x", "not a hub id", "a/b/c", "name",
                                  "weights/model.safetensors", "runs/config.yaml"])
def test_not_hub_ids(name):
    assert not is_hub_id(name)


def test_existing_paths_are_local_and_missing_ones_are_named(tmp_path):
    folder = tmp_path / "org"
    folder.mkdir()
    assert local_path_or_hub_id(folder, "missing") == folder
    assert local_path_or_hub_id("org/name", "missing") == "org/name"
    with pytest.raises(FileNotFoundError, match="thing not found: x.safetensors"):
        local_path_or_hub_id("x.safetensors", "thing not found: x.safetensors")


def test_what_leaves_the_machine_of_a_name_is_a_hub_id_or_a_local_folders_name(tmp_path, monkeypatch):
    """A pushed policy and its card name a local source by its last part only; Hub ids and W&B references stay."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "demos").mkdir(parents=True)
    assert public_name(tmp_path / "org" / "demos") == "demos"
    assert public_name("org/demos") == "demos"  # on disk, so local, though shaped like a Hub id
    assert public_name("lerobot/libero_spatial_image") == "lerobot/libero_spatial_image"
    assert public_name("/home/alice/missing/demos") == "demos"
    assert public_name("wandb:team/atlas/atlas-policy-x:latest") == "wandb:team/atlas/atlas-policy-x:latest"
    # what a card may list as a Hub dataset or base model: a repo, not a local folder or a W&B reference
    assert [is_hub_repo(name) for name in ("lerobot/libero_spatial_image", "org/demos", "wandb:team/atlas/x:v0")] == [
        True, False, False]


def test_a_hub_failure_is_one_line_naming_the_error_type():
    error = FileNotFoundError("404 Client Error.\nRepository Not Found for url: https://huggingface.co/x/y")
    assert hub_failure(error) == ("FileNotFoundError: 404 Client Error. Repository Not Found for url: "
                                  "https://huggingface.co/x/y")
