"""Action heads: per chunk step a pose delta and a gripper command, with their losses and metrics.

Heads work in *head units*: position (and, for `axis_angle`, rotation) normalised by the policy,
the gripper as the raw -1 (open) / +1 (close) command. With `rotation_format: quaternion` the
rotation is predicted as a unit quaternion of the raw axis-angle delta (the earlier system's 8-D
action) and converted back, so the policy leaves those dimensions un-normalised. Padded chunk steps
(past the episode end) never count in a loss or a metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POSE_DIMS = 6  # dx, dy, dz, droll, dpitch, dyaw
GRIPPER = 6


@dataclass
class ActionHeadConfig:
    """What the head predicts and how it is trained."""

    type: Literal["regression", "flow_matching"] = "regression"  # chunked L1 regression (OpenVLA-OFT) or flow matching
    rotation_format: Literal["axis_angle", "quaternion"] = "axis_angle"  # 6-D pose, or xyz + unit quaternion (7-D)
    pose_loss: Literal["l1", "l2", "smooth_l1"] = "l1"
    gripper_loss: Literal["bce", "l1"] = "bce"
    pose_loss_weight: float = 1.0
    gripper_loss_weight: float = 0.1
    hidden_dim: int = 256  # width of the flow-matching velocity MLP
    num_flow_steps: int = 10  # Euler steps when sampling a flow-matching chunk

    def __post_init__(self) -> None:
        choices = {"type": ("regression", "flow_matching"), "rotation_format": ("axis_angle", "quaternion"),
                   "pose_loss": ("l1", "l2", "smooth_l1"), "gripper_loss": ("bce", "l1")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ActionHeadConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.type == "flow_matching" and self.rotation_format != "axis_angle":
            raise ValueError("ActionHeadConfig: type 'flow_matching' needs rotation_format 'axis_angle', "
                             f"got {self.rotation_format!r}")


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
        self.out = nn.Linear(feature_dim, (7 if self.quaternion else POSE_DIMS) + 1)

    def _split(self, features: Tensor) -> tuple[Tensor, Tensor]:
        out = self.out(features)  # (B, H, pose + 1)
        return out[..., :-1], out[..., -1]

    def loss(self, features: Tensor, target: Tensor, valid: Tensor) -> dict[str, Tensor]:
        pose, logit = self._split(features)
        kind = self.config.pose_loss
        if self.quaternion:
            position = pose_error(kind, pose[..., :3], target[..., :3])
            q_pred = F.normalize(pose[..., 3:], dim=-1)
            q_true = axis_angle_to_quaternion(target[..., 3:POSE_DIMS])
            # q and -q encode the same rotation: score against the closer one
            rotation = torch.minimum(pose_error(kind, q_pred, q_true).sum(-1), pose_error(kind, q_pred, -q_true).sum(-1))
            pose_loss = (masked_mean(position.sum(-1), valid) + masked_mean(rotation, valid)) / 7
        else:
            pose_loss = masked_mean(pose_error(kind, pose, target[..., :POSE_DIMS]), valid)
        gripper_target = target[..., GRIPPER]
        if self.config.gripper_loss == "bce":
            gripper = F.binary_cross_entropy_with_logits(logit, (gripper_target > 0).to(logit.dtype), reduction="none")
        else:
            gripper = (torch.tanh(logit) - gripper_target).abs()
        return {"pose_loss": pose_loss, "gripper_loss": masked_mean(gripper, valid)}

    def predict(self, features: Tensor) -> Tensor:
        pose, logit = self._split(features)
        if self.quaternion:
            pose = torch.cat((pose[..., :3], quaternion_to_axis_angle(pose[..., 3:])), dim=-1)
        gripper = torch.where(logit > 0, 1.0, -1.0).to(pose.dtype)
        return torch.cat((pose, gripper.unsqueeze(-1)), dim=-1)  # (B, H, 7)


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
            nn.Linear(feature_dim + 7 + self.time_dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 7),
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
        return {"pose_loss": masked_mean(squared[..., :POSE_DIMS], valid),
                "gripper_loss": masked_mean(squared[..., GRIPPER], valid)}

    def predict(self, features: Tensor) -> Tensor:
        B, H = features.shape[:2]
        x = torch.randn(B, H, 7, device=features.device, dtype=features.dtype)
        steps = self.config.num_flow_steps
        for i in range(steps):
            t = torch.full((B,), i / steps, device=features.device, dtype=features.dtype)
            x = x + self.velocity(features, x, t) / steps
        gripper = torch.where(x[..., GRIPPER] > 0, 1.0, -1.0).to(x.dtype)
        return torch.cat((x[..., :POSE_DIMS], gripper.unsqueeze(-1)), dim=-1)


def build_action_head(config: ActionHeadConfig, feature_dim: int) -> ActionHead:
    """The head `config.type` names."""
    return (RegressionHead if config.type == "regression" else FlowMatchingHead)(config, feature_dim)


def action_metrics(prediction: Tensor, target: Tensor, valid: Tensor, suffix: str = "") -> dict[str, Tensor]:
    """Pose L1 (mean absolute error per dimension), pose L2 (mean Euclidean norm of the 6-D error per
    step) and gripper error rate (open/close mismatch), over valid chunk steps."""
    delta = prediction[..., :POSE_DIMS] - target[..., :POSE_DIMS]
    # closed is > 0 on both sides (also for sources that store the gripper as 0/1)
    mismatch = ((prediction[..., GRIPPER] > 0) != (target[..., GRIPPER] > 0)).float()
    return {f"pose_l1_error{suffix}": masked_mean(delta.abs(), valid),
            f"pose_l2_error{suffix}": masked_mean(delta.norm(dim=-1), valid),
            f"gripper_error{suffix}": masked_mean(mismatch, valid)}
