"""Action head losses, masking and metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from atlas_vla.models.action_head import (
    ActionHeadConfig,
    RegressionHead,
    action_metrics,
    axis_angle_to_quaternion,
    quaternion_to_axis_angle,
)


def head_with_output(config: ActionHeadConfig, pose, logit) -> tuple[RegressionHead, torch.Tensor]:
    """A regression head whose read-out returns exactly `pose` and `logit` for identity features."""
    head = RegressionHead(config, feature_dim=len(pose) + 1)
    with torch.no_grad():
        head.out.weight.copy_(torch.eye(len(pose) + 1))
        head.out.bias.zero_()
    features = torch.tensor([[list(pose) + [logit], list(pose) + [logit]]])  # (B=1, H=2, D)
    return head, features


def test_l1_l2_smooth_l1_and_masking_by_value():
    target = torch.tensor([[[1.0, 0, 0, 0, 0, 0, 1.0], [9.0, 9, 9, 9, 9, 9, -1.0]]])  # step 2 is padding
    valid = torch.tensor([[True, False]])
    pose = [3.0, 0, 0, 0, 0, 0.5]
    expected = {"l1": (2.0 + 0.5) / 6, "l2": (4.0 + 0.25) / 6, "smooth_l1": (1.5 + 0.125) / 6}
    for kind, value in expected.items():
        head, features = head_with_output(ActionHeadConfig(pose_loss_type=kind), pose, logit=0.0)
        out = head.loss(features, target, valid)
        assert out["pose_loss"].item() == pytest.approx(value)
        assert out["gripper_loss"].item() == pytest.approx(math.log(2))  # bce at logit 0
    head, features = head_with_output(ActionHeadConfig(gripper_loss_type="l1"), pose, logit=0.0)
    assert head.loss(features, target, valid)["gripper_loss"].item() == pytest.approx(1.0)  # |tanh(0) - 1|


def test_prediction_gripper_is_exactly_plus_minus_one():
    head, features = head_with_output(ActionHeadConfig(), [0.0] * 6, logit=-0.3)
    assert head.predict(features)[..., 6].tolist() == [[-1.0, -1.0]]
    head, features = head_with_output(ActionHeadConfig(), [0.0] * 6, logit=2.0)
    assert head.predict(features)[..., 6].tolist() == [[1.0, 1.0]]


def test_quaternion_round_trip_and_sign_invariance():
    rotation = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.0, 0.0], [1.0, 2.0, -0.5]])
    q = axis_angle_to_quaternion(rotation)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(quaternion_to_axis_angle(q), rotation, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(quaternion_to_axis_angle(-q), rotation, atol=1e-5, rtol=1e-5)
    target = torch.tensor([[[0.0, 0, 0, 0.3, -0.2, 0.1, 1.0]]])
    quat = axis_angle_to_quaternion(target[..., 3:6])[0, 0].tolist()
    for sign in (1.0, -1.0):
        head, features = head_with_output(ActionHeadConfig(rotation_format="quaternion"),
                                          [0.0, 0, 0] + [sign * v for v in quat], logit=5.0)
        loss = head.loss(features[:, :1], target, torch.tensor([[True]]))
        assert loss["pose_loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_metrics_by_value():
    prediction = torch.tensor([[[3.0, 4, 0, 0, 0, 0, 1.0], [0.0, 0, 0, 0, 0, 0, 1.0]]])
    target = torch.tensor([[[0.0, 0, 0, 0, 0, 0, -1.0], [0.0, 0, 0, 0, 0, 0, 1.0]]])
    metrics = action_metrics(prediction, target, torch.tensor([[True, True]]))
    assert metrics["pose_l1_error"].item() == pytest.approx(7.0 / 12)
    assert metrics["pose_l2_error"].item() == pytest.approx(2.5)  # (5 + 0) / 2
    assert metrics["gripper_error"].item() == pytest.approx(0.5)
    masked = action_metrics(prediction, target, torch.tensor([[False, True]]))
    assert masked["pose_l1_error"].item() == 0.0 and masked["gripper_error"].item() == 0.0


def test_config_errors():
    with pytest.raises(ValueError, match="pose_loss_type must be one of"):
        ActionHeadConfig(pose_loss_type="huber")
    with pytest.raises(ValueError, match="flow_matching' needs rotation_format 'axis_angle'"):
        ActionHeadConfig(type="flow_matching", rotation_format="quaternion")
