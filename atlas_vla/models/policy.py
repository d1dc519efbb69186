"""AtlasPolicy: (camera images, state, instruction) -> the next `action_horizon` 7-D LIBERO actions.

The frozen encoders (VGGT, text model) are held outside the module tree: they never reach the
optimizer, DDP or `model.safetensors`, and a checkpoint records them by id and weight hash instead.
Moving the policy (`.to(device)`, also done by `accelerator.prepare`) moves them too.

Units: batches and observations are in LIBERO units; the policy normalises states and actions with
its stored `NormStats` and un-normalises its predictions, so training, validation and the simulator
share one path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from atlas_vla.constants import (
    ACTIONS,
    ACTIONS_PAD_MASK,
    INSTRUCTION,
    OBS_IMAGES,
    OBS_STATE,
    OBS_VISION_FEATURES,
    STATE_DIM,
)
from atlas_vla.data.normalization import GRIPPER_ACTION_DIMS, NormStats, normalize, unnormalize
from atlas_vla.data.spec import SampleSpec
from atlas_vla.data.transforms import observation_to_sample
from atlas_vla.models.action_head import ActionHeadConfig, action_metrics, build_action_head
from atlas_vla.models.fusion import Fusion, FusionConfig
from atlas_vla.models.language import LanguageConfig, LanguageEncoder
from atlas_vla.models.vggt import VGGTAggregator, VGGTConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
STATS_NAME = "norm_stats.json"
_ROTATION_DIMS = (3, 4, 5)


@dataclass
class PolicyConfig:
    """Everything that defines an Atlas policy; saved as `config.json` with every checkpoint."""

    # observation and action shape (the data pipeline is told these through `sample_spec`)
    image_size: int = 224  # square camera images, a multiple of the VGGT patch size (14)
    use_wrist_camera: bool = True  # agent view + wrist (S = 2 views per time step), or agent view only
    num_temporal_frames: int = 1  # current frame + past frames fed to VGGT as extra views
    temporal_stride: int = 1  # frames between temporal context frames
    action_horizon: int = 8  # actions predicted per query (OpenVLA-OFT: 8)
    use_state: bool = True  # feed the 8-D proprioceptive state as a token
    # frozen geometry backbone
    vggt: VGGTConfig = field(default_factory=VGGTConfig)
    vggt_pretrained: str | None = "facebook/VGGT-1B"  # Hub id, folder or file; null = random init (demo/tests)
    vggt_revision: str | None = None
    vggt_init_seed: int = 0  # seed of the random init when vggt_pretrained is null
    vggt_layers: list[int] = field(default_factory=lambda: [4, 11, 17, 23])  # depth outputs read by the fusion
    freeze_vggt: bool = True  # False fine-tunes the backbone (its weights are then saved with the policy)
    # frozen text encoder, fusion and head
    language: LanguageConfig = field(default_factory=LanguageConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    head: ActionHeadConfig = field(default_factory=ActionHeadConfig)
    normalization_mode: Literal["mean_std", "quantile", "none"] = "mean_std"

    def __post_init__(self) -> None:
        for name, cls in (("vggt", VGGTConfig), ("language", LanguageConfig), ("fusion", FusionConfig),
                          ("head", ActionHeadConfig)):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, _from_dict(cls, value, f"model.{name}"))
        if self.image_size % self.vggt.patch_size:
            raise ValueError(f"model.image_size ({self.image_size}) must be a multiple of the VGGT patch size "
                             f"({self.vggt.patch_size})")
        if self.normalization_mode not in ("mean_std", "quantile", "none"):
            raise ValueError(f"model.normalization_mode must be mean_std, quantile or none, "
                             f"got {self.normalization_mode!r}")
        depth = self.vggt.depth
        bad = [layer for layer in self.vggt_layers if not -depth <= layer < depth]
        if bad or not self.vggt_layers:
            raise ValueError(f"model.vggt_layers {self.vggt_layers} must be non-empty indices into the "
                             f"{depth} VGGT layers")
        self.sample_spec  # validates the shape fields

    @property
    def sample_spec(self) -> SampleSpec:
        return SampleSpec(self.image_size, self.use_wrist_camera, self.num_temporal_frames, self.temporal_stride,
                          self.action_horizon)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PolicyConfig":
        return _from_dict(cls, values, "model")


def _from_dict(cls: type, values: Mapping[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; expected some of {sorted(known)}")
    return cls(**dict(values))


class FrozenEncoders:
    """The frozen VGGT and text encoder: plain attributes of the policy, not registered submodules."""

    def __init__(self, vggt: VGGTAggregator, language: LanguageEncoder) -> None:
        self.vggt = vggt
        self.language = language


class AtlasPolicy(nn.Module):
    """Frozen VGGT + frozen text encoder + trainable fusion and action head.

    `forward(batch)` returns `loss`, `pose_loss`, `gripper_loss` and metrics; `predict_action(obs)`
    returns an (action_horizon, 7) numpy chunk in LIBERO units with the gripper exactly -1 or +1.
    """

    def __init__(self, config: PolicyConfig, norm_stats: NormStats, *, vggt: VGGTAggregator | None = None,
                 language: LanguageEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.norm_stats = norm_stats
        vggt = vggt if vggt is not None else build_vggt(config)
        language = language if language is not None else LanguageEncoder(config.language)
        if config.freeze_vggt:
            self.frozen = FrozenEncoders(vggt.freeze(), language)
        else:
            self.vggt = vggt  # trainable: registered, optimised and saved
            self.frozen = FrozenEncoders(vggt, language)
        spec = config.sample_spec
        grid = config.image_size // config.vggt.patch_size
        self.fusion = Fusion(config.fusion, vision_dim=2 * config.vggt.embed_dim,
                             num_vision_layers=len(config.vggt_layers), num_views=spec.num_views,
                             patch_grid=(grid, grid), language_dim=language.hidden_size, state_dim=STATE_DIM,
                             action_horizon=config.action_horizon)
        self.head = build_action_head(config.head, config.fusion.hidden_dim)
        # position always normalised; rotation kept raw when the head predicts quaternions; gripper raw
        quaternion = config.head.rotation_format == "quaternion"
        self._action_keep = GRIPPER_ACTION_DIMS + (_ROTATION_DIMS if quaternion else ())
        self._history: deque[Tensor] = deque(maxlen=1 + (spec.num_temporal_frames - 1) * spec.temporal_stride)

    # --- devices -------------------------------------------------------------------------------

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .float() ... also move the frozen encoders
        super()._apply(fn, recurse)
        if self.config.freeze_vggt:
            self.frozen.vggt._apply(fn, recurse)
        self.frozen.language.model._apply(fn, recurse)
        self.frozen.language._cache.clear()
        return self

    def cast_frozen(self, dtype: torch.dtype) -> "AtlasPolicy":
        """Store the frozen encoders in `dtype` (bf16 on GPU halves their memory; trainable parts stay fp32)."""
        if self.config.freeze_vggt:
            self.frozen.vggt.to(dtype=dtype)
        self.frozen.language.to(dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.fusion.queries.device

    def num_parameters(self) -> dict[str, int]:
        """Total (frozen encoders included) and trainable parameter counts."""
        frozen = sum(p.numel() for p in self.frozen.language.model.parameters())
        if self.config.freeze_vggt:
            frozen += sum(p.numel() for p in self.frozen.vggt.parameters())
        own = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"total": own + frozen, "trainable": trainable}

    # --- forward -------------------------------------------------------------------------------

    def vision_features(self, images: Tensor) -> Tensor:
        """uint8 images (B, S, 3, H, W) -> the frozen VGGT outputs of `vggt_layers` stacked as
        (B, L, S, P, 2C): what `FeatureCache` stores and what a batch may carry instead of images."""
        if not self.config.freeze_vggt:
            raise ValueError("vision features can only be precomputed for a frozen backbone (model.freeze_vggt: true)")
        return torch.stack(self._frozen_layers(images), dim=1)

    def _frozen_layers(self, images: Tensor) -> list[Tensor]:
        """The frozen VGGT's `vggt_layers` outputs (B, S, P, 2C) for uint8 images (B, S, 3, H, W)."""
        images = images.to(self.device, non_blocking=True).float() / 255.0
        layers, _ = self.frozen.vggt.encode(images, self.config.vggt_layers)
        return layers

    def encode_observations(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Frozen features of a batch: VGGT layers (run now, or precomputed under `OBS_VISION_FEATURES`),
        instruction tokens, normalised state."""
        patch_start_idx = self.config.vggt.patch_start_idx
        if OBS_VISION_FEATURES in batch:
            layers = list(batch[OBS_VISION_FEATURES].to(self.device, non_blocking=True).unbind(1))
        elif self.config.freeze_vggt:  # the live path: no stacking, the layers go straight to the fusion
            layers = self._frozen_layers(batch[OBS_IMAGES])
        else:
            images = batch[OBS_IMAGES].to(self.device, non_blocking=True).float() / 255.0  # (B, S, 3, H, W)
            layers, patch_start_idx = self.vggt(images, self.config.vggt_layers)
        language, language_mask = self.frozen.language.encode(list(batch[INSTRUCTION]))
        state = torch.as_tensor(batch[OBS_STATE], device=self.device).float()
        state = normalize(state, self.norm_stats.state, self.config.normalization_mode)
        if not self.config.use_state:
            state = torch.zeros_like(state)
        return {"layers": layers, "patch_start_idx": patch_start_idx, "language": language,
                "language_mask": language_mask, "state": state}

    def _features(self, encoded: Mapping[str, Any]) -> Tensor:
        return self.fusion([layer.float() for layer in encoded["layers"]], encoded["patch_start_idx"],
                           encoded["language"], encoded["language_mask"], encoded["state"])

    def _to_head_units(self, actions: Tensor) -> Tensor:
        return normalize(actions, self.norm_stats.action, self.config.normalization_mode, keep=self._action_keep)

    def _from_head_units(self, actions: Tensor) -> Tensor:
        return unnormalize(actions, self.norm_stats.action, self.config.normalization_mode, keep=self._action_keep)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Losses and metrics of a batch (LIBERO units in, metrics in real and normalised units out)."""
        features = self._features(self.encode_observations(batch))  # (B, H, D)
        actions = torch.as_tensor(batch[ACTIONS], device=self.device).float()  # (B, H, 7)
        valid = ~torch.as_tensor(batch[ACTIONS_PAD_MASK], device=self.device)
        target = self._to_head_units(actions)
        losses = self.head.loss(features, target, valid)
        loss = (self.config.head.pose_loss_weight * losses["pose_loss"]
                + self.config.head.gripper_loss_weight * losses["gripper_loss"])
        with torch.no_grad():
            predicted = self.head.predict(features.detach())
            metrics = action_metrics(self._from_head_units(predicted), actions, valid)
            metrics.update(action_metrics(predicted, target, valid, suffix="_normalized"))
        return {"loss": loss, **losses, **metrics}

    @torch.no_grad()
    def predict_action_chunk(self, batch: Mapping[str, Any]) -> Tensor:
        """(B, action_horizon, 7) actions in LIBERO units for a batch; gripper exactly -1 or +1."""
        features = self._features(self.encode_observations(batch))
        return self._from_head_units(self.head.predict(features))

    def reset(self) -> None:
        """Forget the frame history (call at the start of every episode)."""
        self._history.clear()

    @torch.no_grad()
    def predict_action(self, observation: Mapping[str, Any]) -> np.ndarray:
        """One observation (`agentview_image`, `wrist_image` upright HWC uint8, `state` (8,),
        `task_description`) -> (action_horizon, 7) float array in LIBERO units."""
        was_training = self.training
        self.eval()
        try:
            spec = self.config.sample_spec
            sample = observation_to_sample(observation, spec)
            views = torch.as_tensor(sample[OBS_IMAGES])  # (num_cameras, 3, H, W)
            self._history.append(views)
            while len(self._history) < self._history.maxlen:  # episode start: repeat the first frame
                self._history.appendleft(self._history[0])
            past = list(self._history)[::-1][:: spec.temporal_stride][: spec.num_temporal_frames]
            batch = {OBS_IMAGES: torch.cat(past, dim=0)[None], OBS_STATE: torch.as_tensor(sample[OBS_STATE])[None],
                     INSTRUCTION: [sample[INSTRUCTION]]}
            return self.predict_action_chunk(batch)[0].cpu().numpy().astype(np.float64)
        finally:
            self.train(was_training)

    # --- saving and loading --------------------------------------------------------------------

    def backbone_references(self) -> dict[str, Any]:
        """What the frozen encoders were: ids and weight hashes, checked when the policy is loaded."""
        refs = {"language": {"model_name_or_path": self.config.language.model_name_or_path,
                             "revision": self.config.language.revision,
                             "weights_hash": self.frozen.language.weights_hash()}}
        if self.config.freeze_vggt:
            refs["vggt"] = {"pretrained": self.config.vggt_pretrained, "revision": self.config.vggt_revision,
                            "init_seed": self.config.vggt_init_seed, "weights_hash": self.frozen.vggt.weights_hash()}
        return refs

    def save_pretrained(self, save_directory: str | os.PathLike, *, references: dict[str, Any] | None = None) -> Path:
        """Write `config.json`, `model.safetensors` (trainable weights only) and `norm_stats.json`.

        The folder is assembled beside the target and swapped in when complete. `references` lets a
        caller that already knows the backbone hashes skip re-hashing them.
        """
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            # the statistics' fingerprint lets loading detect a norm_stats.json swapped in later
            config = {"policy": self.config.to_dict(), "backbones": references or self.backbone_references(),
                      "norm_stats_fingerprint": self.norm_stats.fingerprint, "atlas_vla_version": _version()}
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
            self.norm_stats.save(tmp / STATS_NAME)
            _swap_in(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        norm_stats: NormStats | str | os.PathLike | None = None) -> "AtlasPolicy":
        """Load a saved policy (folder or Hub model id), rebuilding and checking its frozen encoders.

        Refuses, with the reason, a backbone or text encoder whose weights hash differs from the one
        recorded at training time, a `norm_stats.json` whose fingerprint differs from the one recorded in
        `config.json` (folders saved before that was recorded skip this check), and `norm_stats` (if
        given) that differ from the stored ones.
        """
        folder = resolve_policy_folder(name_or_path, revision=revision)
        for name in (CONFIG_NAME, WEIGHTS_NAME, STATS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not an Atlas policy: {name} is missing")
        saved = json.loads((folder / CONFIG_NAME).read_text())
        config = PolicyConfig.from_dict(saved["policy"])
        stats = NormStats.load(folder / STATS_NAME)
        recorded = saved.get("norm_stats_fingerprint")  # absent in folders saved before it was recorded
        if recorded is not None and recorded != stats.fingerprint:
            raise ValueError(f"{folder / STATS_NAME} does not match the statistics the policy was trained with: "
                             f"fingerprint {stats.fingerprint}, expected {recorded} (recorded in "
                             f"{folder / CONFIG_NAME} key 'norm_stats_fingerprint')")
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
        state = load_file(str(folder / WEIGHTS_NAME))
        missing, unexpected = policy.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder / WEIGHTS_NAME} does not fit the policy config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        return policy.eval()

    def load_trainable_weights(self, name_or_path: str | os.PathLike, *, revision: str | None = None) -> "AtlasPolicy":
        """Start from another saved policy's trainable weights (fine-tuning), keeping this policy's
        statistics. Refuses a policy trained on another backbone or with other shapes."""
        folder = resolve_policy_folder(name_or_path, revision=revision)
        if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder} is not an Atlas policy: {CONFIG_NAME} or {WEIGHTS_NAME} is missing")
        saved = json.loads((folder / CONFIG_NAME).read_text()).get("backbones", {})
        mine = self.backbone_references()
        for name, what in (("vggt", "VGGT backbone"), ("language", "text encoder")):
            if name in saved and name in mine:
                _check_hash(what, saved[name], mine[name]["weights_hash"])
        state = load_file(str(folder / WEIGHTS_NAME))
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{folder / WEIGHTS_NAME} does not fit this policy's config: {error}") from error
        return self

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None,
                    commit_message: str = "Upload Atlas policy") -> str:
        """Upload the saved policy folder to the Hub (the token is used, never written anywhere)."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "policy")
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
        return str(info)


_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def resolve_policy_folder(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local folder for a saved policy: the folder itself, or a Hub model id downloaded once.

    Anything that is not an existing folder and does not look like `owner/name` is a missing local path.
    """
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return folder
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or folder.exists() or not _HUB_ID.match(text):
        raise FileNotFoundError(f"policy folder not found: {folder}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(text, revision=revision))


def build_vggt(config: PolicyConfig) -> VGGTAggregator:
    """The policy's VGGT: pretrained weights when `vggt_pretrained` is set, else a seeded random init."""
    if config.vggt_pretrained:
        return VGGTAggregator.from_pretrained(config.vggt_pretrained, revision=config.vggt_revision, config=config.vggt)
    return VGGTAggregator(config.vggt).init_weights(config.vggt_init_seed)


def _check_hash(what: str, reference: Mapping[str, Any] | None, actual: str | None) -> None:
    if reference is None or actual is None:
        return
    if reference.get("weights_hash") != actual:
        raise ValueError(f"the {what} does not match the one this policy was trained with: weights hash {actual} "
                         f"vs {reference.get('weights_hash')} recorded ({reference})")


def _swap_in(new: Path, target: Path) -> None:
    """Replace `target` by the finished folder `new` without ever leaving a half-written `target`."""
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


def _version() -> str:
    from atlas_vla import __version__

    return __version__

