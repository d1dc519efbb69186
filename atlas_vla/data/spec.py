"""SampleSpec: what one training sample (and one inference observation) looks like."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SampleSpec:
    """The shape contract between the data pipeline and the policy.

    The policy owns these numbers (they are part of its config and saved with it); the data
    pipeline is told them when it builds samples, so training, validation and the simulator always
    agree on image size, cameras, temporal context and chunk length.
    """

    image_size: int = 224  # square side in pixels after resizing; a multiple of the patch size (14)
    use_wrist_camera: bool = True  # False: agent-view camera only
    num_temporal_frames: int = 1  # current frame plus num_temporal_frames - 1 past frames
    temporal_stride: int = 1  # frames between two temporal context frames
    action_horizon: int = 8  # actions per chunk (t .. t + action_horizon - 1)

    def __post_init__(self) -> None:
        for name in ("image_size", "num_temporal_frames", "temporal_stride", "action_horizon"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SampleSpec.{name} must be a positive integer, got {value!r}")

    @property
    def num_cameras(self) -> int:
        return 2 if self.use_wrist_camera else 1

    @property
    def num_views(self) -> int:
        """Frames fed to VGGT per sample: S = num_temporal_frames * num_cameras."""
        return self.num_temporal_frames * self.num_cameras
