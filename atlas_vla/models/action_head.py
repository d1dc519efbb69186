"""Action heads: per chunk step a pose delta and a gripper command, with their losses and metrics.

Heads work in *head units*: position (and, for `axis_angle`, rotation) normalised by the policy,
the gripper as the raw -1 (open) / +1 (close) command. With `rotation_format: quaternion` the
rotation is predicted as a unit quaternion of the raw axis-angle delta (the earlier system's 8-D
action) and converted back, so the policy leaves those dimensions un-normalised. Padded chunk steps
(past the episode end) never count in a loss or a metric.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atlas_vla.action_layout import (
    ACTION_DIM,
    GRIPPER,
    POSE,
    POSE_DIM,
    POSITION,
    ROTATION,
    binarize_gripper,
    gripper_closed,
)
from atlas_vla.models.config import ActionHeadConfig


def axis_angle_to_quaternion(rotation: Tensor) -> Tensor:
    """(..., 3) axis-angle -> (..., 4) unit quaternion (w, x, y, z)."""
    angle = rotation.norm(dim=-1, keepdim=True)
    half = angle / 2
    scale = torch.where(angle > 1e-8, torch.sin(half) / angle.clamp_min(1e-8), 0.5 - angle**2 / 48)
    return torch.cat((torch.cos(half), rotation * scale), dim=-1)


def quaternion_to_axis_angle(quaternion: Tensor) -> Tensor:
    """(..., 4) quaternion (w, x, y, z), any norm -> (..., 3) axis-angle with angle in [0, pi]."""
    q = F.normalize(quaternion, dim=-1)
    q = torch.where(q[..., :1] < 0, -q, q)  # q and -q are the same rotation: take w >= 0
    sin_half = q[..., 1:].norm(dim=-1, keepdim=True)
    angle = 2 * torch.atan2(sin_half, q[..., :1])
    scale = torch.where(sin_half > 1e-8, angle / sin_half.clamp_min(1e-8), 2.0 + 0.0 * angle)
    return q[..., 1:] * scale


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of `values` (B, H, ...) over the chunk steps where `valid` (B, H) is True."""
    weights = valid.to(values.dtype).reshape(*valid.shape, *([1] * (values.dim() - valid.dim())))
    count = weights.expand_as(values).sum().clamp_min(1.0)
    return (values * weights).sum() / count


def pose_error(kind: str, prediction: Tensor, target: Tensor) -> Tensor:
    """Element-wise pose loss (no reduction)."""
    if kind == "l1":
        return (prediction - target).abs()
    if kind == "l2":
        return (prediction - target) ** 2
    return F.smooth_l1_loss(prediction, target, reduction="none")


class ActionHead(nn.Module):
    """Base: `loss(features, target, valid)` for training and `predict(features)` for actions (head units)."""

    def __init__(self, config: ActionHeadConfig, feature_dim: int) -> None:
        super().__init__()
        self.config = config
        self.feature_dim = feature_dim

    def loss(self, features: Tensor, target: Tensor, valid: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, features: Tensor) -> Tensor:
        raise NotImplementedError


class RegressionHead(ActionHead):
    """One linear read-out per chunk step: pose (6-D, or xyz + quaternion) and a gripper logit."""

    def __init__(self, config: ActionHeadConfig, feature_dim: int) -> None:
        super().__init__(config, feature_dim)
        self.quaternion = config.rotation_format == "quaternion"
        self.out = nn.Linear(feature_dim, (7 if self.quaternion else POSE_DIM) + 1)  # xyz + quaternion, or the pose; + a gripper logit

    def _split(self, features: Tensor) -> tuple[Tensor, Tensor]:
        out = self.out(features)  # (B, H, pose + 1)
        return out[..., :-1], out[..., -1]

    def loss(self, features: Tensor, target: Tensor, valid: Tensor) -> dict[str, Tensor]:
        pose, logit = self._split(features)
        kind = self.config.pose_loss_type
        if self.quaternion:
            position = pose_error(kind, pose[..., POSITION], target[..., POSITION])
            q_pred = F.normalize(pose[..., 3:], dim=-1)
            q_true = axis_angle_to_quaternion(target[..., ROTATION])
            # q and -q encode the same rotation: score against the closer one
            rotation = torch.minimum(pose_error(kind, q_pred, q_true).sum(-1), pose_error(kind, q_pred, -q_true).sum(-1))
            pose_loss = (masked_mean(position.sum(-1), valid) + masked_mean(rotation, valid)) / 7
        else:
            pose_loss = masked_mean(pose_error(kind, pose, target[..., POSE]), valid)
        gripper_target = target[..., GRIPPER]
        if self.config.gripper_loss_type == "bce":
            gripper = F.binary_cross_entropy_with_logits(logit, gripper_closed(gripper_target).to(logit.dtype),
                                                         reduction="none")
        else:
            gripper = (torch.tanh(logit) - gripper_target).abs()
        return {"pose_loss": pose_loss, "gripper_loss": masked_mean(gripper, valid)}

    def predict(self, features: Tensor) -> Tensor:
        pose, logit = self._split(features)
        if self.quaternion:
            pose = torch.cat((pose[..., POSITION], quaternion_to_axis_angle(pose[..., 3:])), dim=-1)
        return torch.cat((pose, binarize_gripper(logit).to(pose.dtype).unsqueeze(-1)), dim=-1)  # (B, H, 7)


class FlowMatchingHead(ActionHead):
    """Flow matching over the whole 7-D chunk: a velocity MLP per step, conditioned on its query feature.

    Training regresses the velocity `target - noise` at a random time on the straight path from
    noise to the target chunk; prediction integrates it from noise in `num_flow_steps` Euler steps.
    """

    def __init__(self, config: ActionHeadConfig, feature_dim: int) -> None:
        super().__init__(config, feature_dim)
        hidden = config.hidden_dim
        self.time_dim = 32
        self.net = nn.Sequential(
            nn.Linear(feature_dim + ACTION_DIM + self.time_dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, ACTION_DIM),
        )

    def _time_embedding(self, t: Tensor) -> Tensor:
        # t (B,) in [0, 1] -> sinusoidal (B, time_dim)
        freqs = torch.exp(torch.arange(self.time_dim // 2, device=t.device) * (-math.log(1000.0) / (self.time_dim // 2)))
        angles = t[:, None] * 1000.0 * freqs[None]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)

    def velocity(self, features: Tensor, x: Tensor, t: Tensor) -> Tensor:
        time = self._time_embedding(t)[:, None].expand(-1, x.shape[1], -1)
        return self.net(torch.cat((features, x, time), dim=-1))

    def loss(self, features: Tensor, target: Tensor, valid: Tensor) -> dict[str, Tensor]:
        noise = torch.randn_like(target)
        t = torch.rand(target.shape[0], device=target.device, dtype=target.dtype)
        x_t = (1 - t)[:, None, None] * noise + t[:, None, None] * target
        squared = (self.velocity(features, x_t, t) - (target - noise)) ** 2
        return {"pose_loss": masked_mean(squared[..., POSE], valid),
                "gripper_loss": masked_mean(squared[..., GRIPPER], valid)}

    def predict(self, features: Tensor) -> Tensor:
        B, H = features.shape[:2]
        x = torch.randn(B, H, ACTION_DIM, device=features.device, dtype=features.dtype)
        steps = self.config.num_flow_steps
        for i in range(steps):
            t = torch.full((B,), i / steps, device=features.device, dtype=features.dtype)
            x = x + self.velocity(features, x, t) / steps
        return torch.cat((x[..., POSE], binarize_gripper(x[..., GRIPPER]).unsqueeze(-1)), dim=-1)


def build_action_head(config: ActionHeadConfig, feature_dim: int) -> ActionHead:
    """The head `config.type` names."""
    return (RegressionHead if config.type == "regression" else FlowMatchingHead)(config, feature_dim)


def action_metrics(prediction: Tensor, target: Tensor, valid: Tensor, suffix: str = "") -> dict[str, Tensor]:
    """Pose L1 (mean absolute error per dimension), pose L2 (mean Euclidean norm of the 6-D error per
    step) and gripper error rate (open/close mismatch), over valid chunk steps."""
    delta = prediction[..., POSE] - target[..., POSE]
    mismatch = (gripper_closed(prediction[..., GRIPPER]) != gripper_closed(target[..., GRIPPER])).float()
    return {f"pose_l1_error{suffix}": masked_mean(delta.abs(), valid),
            f"pose_l2_error{suffix}": masked_mean(delta.norm(dim=-1), valid),
            f"gripper_error{suffix}": masked_mean(mismatch, valid)}
