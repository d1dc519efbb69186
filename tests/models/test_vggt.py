"""VGGT aggregator: exact against the official fixtures, weight-compatible, frozen use, input checks."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from atlas_vla.models.vggt import DinoConfig, VGGTAggregator, VGGTConfig

TINY = dict(embed_dim=64, depth=2, num_heads=4)


def tiny_config() -> VGGTConfig:
    return VGGTConfig(**TINY, dino=DinoConfig(**TINY))


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    return load_file(str(fixtures_dir / "vggt" / "vggt_tiny_reference.safetensors"))


@pytest.fixture(scope="module")
def tiny_state(reference):
    return {k[len("state."):]: v for k, v in reference.items() if k.startswith("state.")}


@pytest.fixture(scope="module")
def tiny_model(tiny_state):
    model = VGGTAggregator(tiny_config()).eval()
    model.load_state_dict(tiny_state, strict=True)
    return model


def test_matches_official_outputs(tiny_model, reference):
    with torch.no_grad():
        outputs, patch_start_idx = tiny_model(reference["input.images"])
    assert patch_start_idx == 5
    assert len(outputs) == 2
    for i, out in enumerate(outputs):
        expected = reference[f"output.layer_{i}"]
        assert out.shape == expected.shape == (2, 2, 261, 128)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_layer_selection_equals_full_output_entries(tiny_model, reference):
    images = reference["input.images"][:1]
    with torch.no_grad():
        full, _ = tiny_model(images)
        picked, _ = tiny_model(images, layers=[-1, 0])
    assert len(picked) == 2
    torch.testing.assert_close(picked[0], full[1], atol=0, rtol=0)
    torch.testing.assert_close(picked[1], full[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="out of range"):
        tiny_model(images, layers=[2])


def test_vggt_1b_keys_shapes_order_and_count(fixtures_dir):
    manifest = json.loads((fixtures_dir / "vggt" / "vggt_1b_keys.json").read_text())
    expected = [(k[len("aggregator."):], v) for k, v in manifest["model"].items() if k.startswith("aggregator.")]
    with torch.device("meta"):
        model = VGGTAggregator(VGGTConfig())
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == expected
    assert sum(p.numel() for p in model.parameters()) == manifest["aggregator_param_count"] == 909_112_320
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["patch_embed.mask_token"]


@pytest.mark.parametrize("frames,height,width", [(1, 28, 28), (2, 42, 28), (3, 28, 56)])
def test_frames_and_non_square_inputs(tiny_model, frames, height, width):
    with torch.no_grad():
        outputs, idx = tiny_model(torch.rand(2, frames, 3, height, width))
    patches = (height // 14) * (width // 14)
    assert [o.shape for o in outputs] == [(2, frames, idx + patches, 128)] * 2
    assert all(torch.isfinite(o).all() for o in outputs)


@pytest.mark.parametrize(
    "shape,match",
    [((2, 3, 28, 28), r"\(B, S, 3, H, W\)"), ((1, 2, 4, 28, 28), r"\(B, S, 3, H, W\)"), ((1, 2, 3, 30, 28), "multiples of 14")],
)
def test_bad_shapes_raise(tiny_model, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(torch.rand(*shape))


def test_integer_images_rejected(tiny_model):
    with pytest.raises(ValueError, match="float images"):
        tiny_model(torch.zeros(1, 1, 3, 28, 28, dtype=torch.uint8))


def full_model_state(tiny_state):
    """A state dict laid out like the whole official VGGT checkpoint: aggregator plus heads."""
    state = {f"aggregator.{k}": v for k, v in tiny_state.items()}
    state["camera_head.trunk.0.weight"] = torch.randn(8, 8)
    state["depth_head.projects.0.bias"] = torch.randn(8)
    return state


def test_from_pretrained_reads_only_the_aggregator(tmp_path, tiny_state, tiny_model, reference):
    images = reference["input.images"][:1]
    with torch.no_grad():
        expected, _ = tiny_model(images)
    safetensors_file = tmp_path / "model.safetensors"
    save_file(full_model_state(tiny_state), str(safetensors_file))
    pt_file = tmp_path / "other" / "model.pt"
    pt_file.parent.mkdir()
    torch.save(full_model_state(tiny_state), pt_file)
    bare_file = tmp_path / "bare.safetensors"
    save_file(tiny_state, str(bare_file))
    for source in (safetensors_file, tmp_path, pt_file, pt_file.parent, bare_file):
        model = VGGTAggregator.from_pretrained(str(source), config=tiny_config()).eval()
        with torch.no_grad():
            outputs, _ = model(images)
        torch.testing.assert_close(outputs[1], expected[1], atol=0, rtol=0)
        assert not model.patch_embed.mask_token.requires_grad
        assert model.loaded_from == str(source)


def test_from_pretrained_errors(tmp_path, tiny_state):
    missing = dict(tiny_state)
    del missing["frame_blocks.0.attn.qkv.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing keys.*frame_blocks\.0\.attn\.qkv\.weight"):
        VGGTAggregator.from_pretrained(str(tmp_path / "missing.safetensors"), config=tiny_config())
    shaped = dict(tiny_state)
    shaped["camera_token"] = torch.zeros(1, 2, 1, 32)
    save_file(shaped, str(tmp_path / "shaped.safetensors"))
    with pytest.raises(ValueError, match=r"mis-shaped.*camera_token \(1, 2, 1, 32\) \(expected \(1, 2, 1, 64\)\)"):
        VGGTAggregator.from_pretrained(str(tmp_path / "shaped.safetensors"), config=tiny_config())
    with pytest.raises(ValueError, match="does not match"):  # tiny weights into the default VGGT-1B config
        VGGTAggregator.from_pretrained(str(tmp_path / "shaped.safetensors"))
    with pytest.raises(FileNotFoundError):
        VGGTAggregator.from_pretrained(str(tmp_path / "nope.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        VGGTAggregator.from_pretrained(str(tmp_path / "empty"))


def test_weights_hash_tracks_the_weights(tmp_path, tiny_state, tiny_model):
    save_file(tiny_state, str(tmp_path / "w.safetensors"))
    loaded = VGGTAggregator.from_pretrained(str(tmp_path / "w.safetensors"), config=tiny_config())
    assert loaded.weights_hash() == tiny_model.weights_hash()
    assert len(loaded.weights_hash()) == 16
    with torch.no_grad():
        loaded.camera_token.add_(1e-3)
    assert loaded.weights_hash() != tiny_model.weights_hash()


def test_random_init_is_deterministic():
    a = VGGTAggregator(tiny_config()).init_weights(seed=3)
    b = VGGTAggregator(tiny_config()).init_weights(seed=3)
    c = VGGTAggregator(tiny_config()).init_weights(seed=4)
    assert a.weights_hash() == b.weights_hash() != c.weights_hash()


def test_frozen_encode_builds_no_graph_and_feeds_trainable_layers(tiny_model):
    model = VGGTAggregator(tiny_config())
    model.load_state_dict(tiny_model.state_dict())
    model.freeze()
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    outputs, _ = model.encode(torch.rand(1, 2, 3, 28, 28), layers=[-1])
    assert outputs[0].grad_fn is None and not outputs[0].requires_grad
    head = torch.nn.Linear(128, 1)
    head(outputs[0]).sum().backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


def test_config_round_trip():
    config = tiny_config()
    assert VGGTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown key vggt.embed_dimension"):
        VGGTConfig.from_dict({"embed_dimension": 3})
    with pytest.raises(ValueError, match="divisible"):
        VGGTConfig(embed_dim=64, num_heads=5, dino=DinoConfig(embed_dim=64))


def test_empty_layer_list_and_empty_images_are_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="at least one depth output"):
        tiny_model(torch.rand(1, 1, 3, 28, 28), layers=[])
    with pytest.raises(ValueError, match="multiples of 14"):
        tiny_model(torch.rand(1, 1, 3, 0, 28))


def test_weights_hash_handles_scalar_tensors():
    from atlas_vla.models.weights import weights_hash

    module = torch.nn.Module()
    module.register_buffer("scale", torch.tensor(2.0))
    # SHA-256 over the entry's name, dtype and shape, then its bytes (an independent spelling of the rule)
    digest = hashlib.sha256(b"scale|torch.float32|()" + struct.pack("<f", 2.0)).hexdigest()[:16]
    assert weights_hash(module) == digest == "4ea64a115594486b"
    module.scale.fill_(3.0)
    assert weights_hash(module) != digest


class NotATensor:
    """Any class: torch.load(weights_only=True) refuses to unpickle it."""


def test_unreadable_weight_files_name_the_file_and_never_advise_unpickling(tmp_path, tiny_state):
    pickled = tmp_path / "pickled" / "model.pt"
    pickled.parent.mkdir()
    torch.save({**tiny_state, "extra": NotATensor()}, pickled)
    with pytest.raises(ValueError) as error:
        VGGTAggregator.from_pretrained(str(pickled), config=tiny_config())
    message = str(error.value)
    assert str(pickled) in message and "never unpickles" in message
    assert "weights_only=False" not in message and "weights_only` set to `False`" not in message
    truncated = tmp_path / "truncated.safetensors"
    save_file(tiny_state, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:64])
    with pytest.raises(ValueError, match=r"truncated.safetensors is not a readable safetensors file"):
        VGGTAggregator.from_pretrained(str(truncated), config=tiny_config())
