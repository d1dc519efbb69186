"""AtlasPolicy: training signal, frozen parts, save/load, prediction on the real observation fixture."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers import synthetic_dataset, tiny_policy_config
from safetensors import safe_open

from atlas_vla.cli import main as cli
from atlas_vla.constants import OBJECT_POSITIONS
from atlas_vla.data.normalization import compute_norm_stats
from atlas_vla.data.samples import LiberoSamples, collate
from atlas_vla.data.sources import load_libero
from atlas_vla.models.config import ActionHeadConfig, PolicyConfig
from atlas_vla.models.policy import AtlasPolicy


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_libero(str(synthetic_dataset(tmp_path_factory.mktemp("data"))))


@pytest.fixture(scope="module")
def stats(data):
    return compute_norm_stats(data)


def batch_of(data, config: PolicyConfig, size: int = 8):
    samples = LiberoSamples(data, config.sample_spec)
    return collate([samples[i] for i in range(size)])


@pytest.mark.parametrize("head", [ActionHeadConfig(), ActionHeadConfig(rotation_format="quaternion"),
                                  ActionHeadConfig(type="flow_matching")])
def test_loss_falls_and_only_trainable_parameters_get_gradients(data, stats, head):
    torch.manual_seed(0)
    config = tiny_policy_config(head=head)
    policy = AtlasPolicy(config, stats)
    batch = batch_of(data, config)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = policy(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out["loss"].item())
    # flow matching draws a new noise and time every step, so its loss is noisier
    assert np.mean(losses[-5:]) < (0.75 if head.type == "flow_matching" else 0.5) * np.mean(losses[:5])
    assert all(p.grad is None for p in policy.frozen.vggt.parameters())
    assert all(p.grad is None for p in policy.frozen.language.model.parameters())
    names = {name for name, _ in policy.named_parameters()}
    assert not any(name.startswith(("vggt.", "frozen")) for name in names)
    assert {"loss", "pose_loss", "gripper_loss", "pose_l1_error", "pose_l2_error", "gripper_error",
            "pose_l1_error_normalized"} <= set(out)


def test_parameter_counts(stats):
    policy = AtlasPolicy(tiny_policy_config(), stats)
    # the tiny policy: 166,151 trainable (fusion + head); frozen: the tiny VGGT (427,456) and MiniLM (22,713,216)
    assert policy.num_parameters() == {"total": 166_151 + 427_456 + 22_713_216, "trainable": 166_151}
    assert sum(p.numel() for p in policy.parameters()) == 166_151  # what the optimizer sees


def test_save_load_identical_predictions_and_no_frozen_weights(tmp_path, data, stats, observation_file):
    torch.manual_seed(0)
    config = tiny_policy_config()
    policy = AtlasPolicy(config, stats).eval()
    folder = policy.save_pretrained(tmp_path / "policy")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "norm_stats.json"]
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith(("fusion.", "head.")) for k in keys)
    loaded = AtlasPolicy.from_pretrained(folder, norm_stats=stats)
    batch = batch_of(data, config, 4)
    torch.testing.assert_close(loaded.predict_action_chunk(batch), policy.predict_action_chunk(batch))
    observation = dict(np.load(observation_file))
    np.testing.assert_array_equal(loaded.predict_action(observation), policy.predict_action(observation))
    # saving again over the same folder replaces it completely
    policy.save_pretrained(folder)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_mismatched_backbone_or_stats_refused(tmp_path, data, stats):
    config = tiny_policy_config()
    folder = AtlasPolicy(config, stats).save_pretrained(tmp_path / "policy")
    saved = json.loads((folder / "config.json").read_text())
    saved["policy"]["vggt_init_seed"] = 1  # a different backbone than the recorded hash
    (folder / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="VGGT backbone does not match"):
        AtlasPolicy.from_pretrained(folder)
    folder = AtlasPolicy(config, stats).save_pretrained(tmp_path / "policy")
    other = compute_norm_stats(data.select(range(20)))
    with pytest.raises(ValueError, match="come from other data"):
        AtlasPolicy.from_pretrained(folder, norm_stats=other)
    with pytest.raises(FileNotFoundError, match="not an Atlas policy"):
        AtlasPolicy.from_pretrained(tmp_path)


def test_replaced_stats_file_in_saved_folder_refused(tmp_path, data, stats):
    folder = AtlasPolicy(tiny_policy_config(), stats).save_pretrained(tmp_path / "policy")
    assert json.loads((folder / "config.json").read_text())["norm_stats_fingerprint"] == stats.fingerprint
    other = compute_norm_stats(data.select(range(20)))
    assert other.fingerprint != stats.fingerprint
    other.save(folder / "norm_stats.json")  # statistics of other data swapped into the folder
    with pytest.raises(ValueError, match="norm_stats.json does not match") as error:
        AtlasPolicy.from_pretrained(folder)
    assert other.fingerprint in str(error.value) and stats.fingerprint in str(error.value)
    # a folder saved before the fingerprint and hash were recorded still loads (nothing to compare)
    saved = json.loads((folder / "config.json").read_text())
    del saved["norm_stats_fingerprint"], saved["norm_stats_hash"]
    (folder / "config.json").write_text(json.dumps(saved))
    assert AtlasPolicy.from_pretrained(folder).norm_stats.fingerprint == other.fingerprint


def test_hand_edited_stats_in_a_saved_folder_are_refused_by_predict(tmp_path, stats, observation_file, capsys):
    """The fingerprint inside norm_stats.json still matches after a hand edit; the recomputed hash does not."""
    folder = AtlasPolicy(tiny_policy_config(), stats).save_pretrained(tmp_path / "policy")
    values = json.loads((folder / "norm_stats.json").read_text())
    values["action"]["std"][0] *= 2
    (folder / "norm_stats.json").write_text(json.dumps(values))
    assert cli(["predict", "--policy", str(folder), "--observation", str(observation_file)]) == 2
    error = capsys.readouterr().err
    assert "norm_stats.json was changed after the policy was saved" in error and "'norm_stats_hash'" in error
    assert len([line for line in error.splitlines() if "error" in line]) == 1 and "Traceback" not in error


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
     "model.safetensors is not a readable safetensors file"),
    (lambda f: (f / "config.json").write_text((f / "config.json").read_text().replace('"hidden_dim": 64', '"hidden_dim": 96')),
     r"model.safetensors does not fit the policy config in .*config.json: .* is \(\d+(, \d+)*\), expected"),
], ids=["truncated-weights", "config-shapes"])
def test_damaged_policy_folders_fail_with_one_line(tmp_path, stats, observation_file, capsys, damage, message):
    folder = AtlasPolicy(tiny_policy_config(), stats).save_pretrained(tmp_path / "policy")
    damage(folder)
    assert cli(["predict", "--policy", str(folder), "--observation", str(observation_file)]) == 2
    error = capsys.readouterr().err
    assert re.search(message, error), error
    assert "Traceback" not in error and len([line for line in error.splitlines() if "error" in line]) == 1


def test_predict_refuses_observation_files_it_would_have_to_unpickle(tmp_path, stats, capsys):
    import pickle

    folder = AtlasPolicy(tiny_policy_config(), stats).save_pretrained(tmp_path / "policy")
    not_npz = tmp_path / "observation.pkl"
    not_npz.write_bytes(pickle.dumps({"state": [0.0] * 8}))
    assert cli(["predict", "--policy", str(folder), "--observation", str(not_npz)]) == 2
    error = capsys.readouterr().err
    assert f"{not_npz} is not an .npz file" in error and "allow_pickle" not in error
    objects = tmp_path / "objects.npz"
    np.savez(objects, agentview_image=np.zeros((4, 4, 3), np.uint8), wrist_image=np.zeros((4, 4, 3), np.uint8),
             state=np.zeros(8), task_description=np.array([{"text": "x"}], dtype=object))
    assert cli(["predict", "--policy", str(folder), "--observation", str(objects)]) == 2
    error = capsys.readouterr().err
    assert "key 'task_description' holds pickled Python objects" in error and "allow_pickle" not in error


def test_predict_on_real_observation(stats, observation_file, tmp_path, capsys):
    config = tiny_policy_config(num_temporal_frames=2, temporal_stride=2)
    policy = AtlasPolicy(config, stats)
    observation = dict(np.load(observation_file))
    chunk = policy.predict_action(observation)
    assert chunk.shape == (4, 7) and np.isfinite(chunk).all()
    assert set(np.unique(chunk[:, 6])) <= {-1.0, 1.0}
    folder = policy.save_pretrained(tmp_path / "policy")
    assert cli(["predict", "--checkpoint", str(folder), "--observation", str(observation_file), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # what the command prints is what the saved policy predicts (JSON keeps every float64 digit)
    loaded = AtlasPolicy.from_pretrained(folder).predict_action(observation)
    np.testing.assert_array_equal(np.asarray(printed["actions"]), loaded)
    np.testing.assert_array_equal(np.asarray(printed["actions"]), chunk)


def test_config_validation_and_round_trip():
    config = tiny_policy_config()
    assert PolicyConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="multiple of the VGGT patch size"):
        tiny_policy_config(image_size=50)
    with pytest.raises(ValueError, match="vggt_layers"):
        tiny_policy_config(vggt_layers=[5])
    with pytest.raises(ValueError, match=r"unknown key model.fusion.hiden_dim \(did you mean 'hidden_dim'"):
        PolicyConfig.from_dict({"fusion": {"hiden_dim": 3}})


def test_policy_folder_resolution(tmp_path):
    from atlas_vla.models.pretrained import resolve_policy_folder

    assert resolve_policy_folder(tmp_path) == tmp_path
    for missing in (str(tmp_path / "nope"), "./relative/nope", "not a hub id"):
        with pytest.raises(FileNotFoundError, match="policy folder not found"):
            resolve_policy_folder(missing)
    # an owner/name id, dots included, goes to the Hub: unreachable (or offline) and not cached here, so the
    # Hub's own LocalEntryNotFoundError, named with the id
    with pytest.raises(FileNotFoundError, match=r"policy 'org/atlas-libero-v1\.5' is not a local folder and could not "
                       r"be had from the Hub \(revision main\): LocalEntryNotFoundError: ") as error:
        resolve_policy_folder("org/atlas-libero-v1.5")
    assert type(error.value.__cause__).__name__ == "LocalEntryNotFoundError"


def test_predict_action_restores_training_mode_after_an_error(stats):
    policy = AtlasPolicy(tiny_policy_config(), stats).train()
    with pytest.raises(ValueError):
        policy.predict_action({"agentview_image": np.zeros((8, 8)), "wrist_image": np.zeros((8, 8, 3), np.uint8),
                               "state": np.zeros(8), "task_description": "x"})
    assert policy.training


def test_state_noise_is_training_only(data, stats):
    """`state_noise_std` perturbs the state token in training mode; validation and predictions see the real state."""
    torch.manual_seed(0)
    quiet = AtlasPolicy(tiny_policy_config(), stats)
    noisy = AtlasPolicy(tiny_policy_config(state_noise_std=0.5), stats)
    noisy.load_state_dict(quiet.state_dict())
    batch = batch_of(data, quiet.config)
    for policy in (quiet, noisy):
        policy.eval()
    assert torch.equal(quiet(batch)["loss"], noisy(batch)["loss"])
    assert torch.equal(quiet.predict_action_chunk(batch), noisy.predict_action_chunk(batch))
    for policy in (quiet, noisy):
        policy.train()
    assert not torch.equal(quiet(batch)["loss"], noisy(batch)["loss"])
    torch.manual_seed(1)
    first = noisy(batch)["loss"]
    torch.manual_seed(1)
    assert torch.equal(first, noisy(batch)["loss"])  # the torch generator draws it: seeded runs repeat exactly
    with pytest.raises(ValueError, match="state_noise_std must be a non-negative number, got -1"):
        tiny_policy_config(state_noise_std=-1)


def test_state_dropout_withholds_the_state_of_a_seeded_share_of_samples_in_training_only(data, stats):
    """`state_dropout`: in training mode each sample's state is withheld (as `use_state: false` withholds it) with
    that probability, drawn from torch's generator; validation and predictions always see the state."""
    torch.manual_seed(0)
    plain = AtlasPolicy(tiny_policy_config(), stats)
    stateless = AtlasPolicy(tiny_policy_config(use_state=False), stats)
    dropped = {p: AtlasPolicy(tiny_policy_config(state_dropout=p), stats) for p in (0.5, 1.0)}
    for policy in (stateless, *dropped.values()):
        policy.load_state_dict(plain.state_dict())
    batch = batch_of(data, plain.config)
    for policy in (plain, stateless, *dropped.values()):
        policy.eval()
    for policy in dropped.values():
        assert torch.equal(policy.predict_action_chunk(batch), plain.predict_action_chunk(batch))
        assert torch.equal(policy(batch)["loss"], plain(batch)["loss"])
    assert not torch.equal(stateless(batch)["loss"], plain(batch)["loss"])  # the state matters to this model
    for policy in (plain, stateless, *dropped.values()):
        policy.train()
    assert torch.equal(dropped[1.0](batch)["loss"], stateless(batch)["loss"])  # every state withheld
    encoded = plain.encode_observations(batch)
    torch.manual_seed(3)
    decode = dropped[0.5]._decode  # the fusion's input: which samples kept their state
    seen = []
    dropped[0.5]._decode = lambda enc, truth: seen.append(enc["state"].clone()) or decode(enc, truth)
    dropped[0.5](batch)
    withheld = (seen[0] == 0).all(dim=1)
    assert 0 < int(withheld.sum()) < len(withheld)
    assert torch.equal(seen[0][~withheld], encoded["state"][~withheld])
    torch.manual_seed(3)
    dropped[0.5](batch)
    assert torch.equal(seen[1], seen[0])  # seeded: the same samples again
    with pytest.raises(ValueError, match=r"state_dropout must be in \[0, 1\], got 1.5"):
        tiny_policy_config(state_dropout=1.5)


def test_the_locate_query_learns_the_positions_the_batch_knows_and_is_absent_at_weight_zero(data, stats):
    """`locate_weight`: one more fusion query whose read-out regresses `OBJECT_POSITIONS` (L1 in metres over the
    finite coordinates, times the weight, joins the loss); actions still come from the action queries alone. At 0
    the policy has no such query: the same parameters and outputs as a policy configured without it."""
    torch.manual_seed(0)
    plain = AtlasPolicy(tiny_policy_config(), stats)
    torch.manual_seed(0)
    off = AtlasPolicy(tiny_policy_config(locate_weight=0.0), stats)
    assert off.locator is None and off.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(), plain.state_dict().values()))
    batch = batch_of(data, plain.config)
    assert torch.equal(off(batch)["locate_loss"], torch.zeros(()))

    policy = AtlasPolicy(tiny_policy_config(locate_weight=2.0), stats)
    H = policy.config.action_horizon
    assert policy.fusion.queries.shape[0] == H + 1
    assert policy.predict_action_chunk(batch).shape == (8, H, 7)
    positions = torch.linspace(-0.3, 0.9, 48).reshape(8, 6)
    positions[:4, :3] = float("nan")  # the goal object moves with the hand: unknown
    positions[6:] = float("nan")  # a recorded episode: nothing known
    batch[OBJECT_POSITIONS] = positions
    out = policy(batch)
    _, located = policy._decode(policy.encode_observations(batch))
    known = torch.isfinite(positions)
    assert out["locate_loss"].item() == pytest.approx((located - positions)[known].abs().mean().item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(
        (out["pose_loss"] + 0.1 * out["gripper_loss"] + 2.0 * out["locate_loss"]).item(), rel=1e-6)

    unknown = dict(batch, **{OBJECT_POSITIONS: torch.full((8, 6), float("nan"))})
    out = policy(unknown)
    out["loss"].backward()
    assert out["locate_loss"].item() == 0.0 and torch.equal(policy.locator.weight.grad, torch.zeros(6, 64))
    policy.zero_grad()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    first = policy(batch)["locate_loss"].item()
    for _ in range(30):
        policy(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert policy(batch)["locate_loss"].item() < 0.3 * first
    with pytest.raises(ValueError, match="locate_weight must be a non-negative number, got -1"):
        tiny_policy_config(locate_weight=-1)


def test_locate_input_gives_the_action_queries_the_vectors_from_the_hand_to_what_was_located(tmp_path, data, stats,
                                                                                              observation_file):
    """`locate_input`: the locate query decodes first; its positions minus the end effector's, in `WHERE_UNIT`, become
    one more context token for the action queries. The actions depend on them, the action loss never reaches the
    locator (detached), a hand and positions moved together give the same token, and the config refuses the
    settings under which the state does not say where the hand is. A saved policy predicts the same."""
    from atlas_vla.constants import OBS_STATE
    from atlas_vla.models.policy import WHERE_UNIT

    torch.manual_seed(0)
    policy = AtlasPolicy(tiny_policy_config(locate_weight=1.0, locate_input=True), stats)
    H = policy.config.action_horizon
    batch = batch_of(data, policy.config)
    seen = []
    policy.where[0].register_forward_hook(lambda module, args, output: seen.append(args[0].detach().clone()))
    features, located = policy._decode(policy.encode_observations(batch))
    assert features.shape == (8, H, 64) and located.shape == (8, 6)
    located = located.detach()
    hand = torch.as_tensor(batch[OBS_STATE])[:, :3]
    expected = torch.cat((located[:, :3] - hand, located[:, 3:] - hand), dim=1) / WHERE_UNIT
    assert torch.allclose(seen[-1], expected, atol=1e-6)
    assert torch.allclose(policy._where_token(located + 0.25, hand + 0.25), policy._where_token(located, hand),
                          atol=1e-5)

    before = policy.predict_action_chunk(batch)
    with torch.no_grad():
        policy.locator.bias += 0.2  # it now says the objects are 20 cm further along every axis
    after = policy.predict_action_chunk(batch)
    assert not torch.allclose(before, after)  # the actions read where things are

    policy.zero_grad()
    out = policy(batch)
    out["pose_loss"].backward()
    assert policy.locator.weight.grad is None or not policy.locator.weight.grad.any()
    assert policy.where[0].weight.grad.abs().sum() > 0
    policy.zero_grad()
    policy(dict(batch, **{OBJECT_POSITIONS: torch.full((8, 6), 0.5)}))["locate_loss"].backward()
    assert policy.locator.weight.grad.abs().sum() > 0  # the locate loss still trains it
    policy.eval()
    loaded = AtlasPolicy.from_pretrained(policy.save_pretrained(tmp_path / "policy"), norm_stats=stats)
    observation = dict(np.load(observation_file))
    np.testing.assert_array_equal(loaded.predict_action(observation), policy.predict_action(observation))
    for bad in (dict(locate_input=True), dict(locate_weight=1.0, locate_input=True, use_state=False),
                dict(locate_weight=1.0, locate_input=True, state_dropout=0.3)):
        with pytest.raises(ValueError, match="model.locate_input needs model.locate_weight > 0"):
            tiny_policy_config(**bad)


def test_locate_input_truth_starts_the_vectors_at_the_simulators_positions_in_training_only(data, stats):
    """`locate_input_truth`: in training, a drawn share of the samples (torch's generator) gets vectors from the
    hand to the batch's `OBJECT_POSITIONS` on the coordinates it knows and to the located positions on the rest; in
    evaluation, and for the samples not drawn, the vectors start from the located positions only."""
    from atlas_vla.constants import OBS_STATE
    from atlas_vla.models.policy import WHERE_UNIT

    torch.manual_seed(0)
    policy = AtlasPolicy(tiny_policy_config(locate_weight=1.0, locate_input=True, locate_input_truth=0.5), stats)
    known = torch.linspace(-0.3, 0.9, 48).reshape(8, 6)
    known[4:, :3] = float("nan")  # the last four know the target only (the bowl is in the hand)
    batch = dict(batch_of(data, policy.config), **{OBJECT_POSITIONS: known})
    hand = torch.as_tensor(batch[OBS_STATE])[:, :3].repeat(1, 2)
    seen, located = [], []
    policy.where[0].register_forward_hook(lambda module, args, output: seen.append(args[0].detach().clone()))
    policy.locator.register_forward_hook(lambda module, args, output: located.append(output.detach().clone()))
    torch.manual_seed(3)
    drawn = torch.rand(8, 1) < 0.5
    assert 0 < drawn.sum() < 8
    torch.manual_seed(3)
    policy.train()
    policy(batch)
    given = torch.where(drawn & torch.isfinite(known), known, located[-1])
    assert torch.allclose(seen[-1], (given - hand) / WHERE_UNIT, atol=1e-6)
    policy.eval()
    policy(batch)
    assert torch.allclose(seen[-1], (located[-1] - hand) / WHERE_UNIT, atol=1e-6)
    with pytest.raises(ValueError, match="model.locate_input_truth: 0.5 replaces what model.locate_input feeds"):
        tiny_policy_config(locate_weight=1.0, locate_input_truth=0.5)
    with pytest.raises(ValueError, match=r"model.locate_input_truth must be in \[0, 1\], got 2"):
        tiny_policy_config(locate_weight=1.0, locate_input=True, locate_input_truth=2)


def test_locate_says_where_the_locate_query_puts_the_goal_object_and_its_target(stats, observation_file):
    """`locate(observation)`: the locate query's read-out for one observation taken as an episode's first frame, as
    rows (object xyz, target xyz); the policy's mode is left as it was; a policy without the query says so."""
    from atlas_vla.data.observations import ObservationHistory, batch_inputs

    torch.manual_seed(0)
    policy = AtlasPolicy(tiny_policy_config(locate_weight=1.0, locate_input=True), stats)
    observation = dict(np.load(observation_file))
    policy.train()
    located = policy.locate(observation)
    assert policy.training and located.shape == (2, 3)
    history = ObservationHistory(policy.config.sample_spec)
    history.add(observation)
    policy.eval()
    with torch.no_grad():
        _, expected = policy._decode(policy.encode_observations(batch_inputs([history.model_inputs()])))
        expected = expected.view(2, 3)
        policy.locator.weight.zero_()
        policy.locator.bias.copy_(torch.tensor([0.1, -0.2, 0.9, 0.3, 0.05, 1.0]))
    np.testing.assert_allclose(located, expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(policy.locate(observation), [[0.1, -0.2, 0.9], [0.3, 0.05, 1.0]], atol=1e-6)
    with pytest.raises(ValueError, match="no locate query"):
        AtlasPolicy(tiny_policy_config(), stats).locate(observation)
