"""AtlasPolicy: (camera images, state, instruction) -> the next `action_horizon` 7-D LIBERO actions.

The frozen encoders (VGGT, text model) are held outside the module tree: they never reach the
optimizer, DDP or `model.safetensors`, and a checkpoint records them by id and weight hash instead.
Moving the policy (`.to(device)`, also done by `accelerator.prepare`) moves them too.

Units: batches and observations are in LIBERO units; the policy normalises states and actions with
its stored `NormStats` and un-normalises its predictions, so training, validation and the simulator
share one path.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from atlas_vla.action_layout import GRIPPER, ROTATION
from atlas_vla.constants import (
    ACTIONS,
    ACTIONS_PAD_MASK,
    EEF_POSITION,
    INSTRUCTION,
    OBJECT_POSITIONS,
    OBS_IMAGES,
    OBS_STATE,
    OBS_VISION_FEATURES,
    STATE_DIM,
)
from atlas_vla.data.normalization import NormStats, normalize, unnormalize
from atlas_vla.data.observations import ObservationHistory, batch_inputs
from atlas_vla.models.action_head import action_metrics, build_action_head
from atlas_vla.models.config import PolicyConfig
from atlas_vla.models.fusion import Fusion
from atlas_vla.models.language import LanguageEncoder
from atlas_vla.models.locator import LinearLocator, SpatialLocator
from atlas_vla.models.pretrained import PretrainedPolicy
from atlas_vla.models.stem import PixelStem
from atlas_vla.models.vggt import VGGTAggregator, build_vggt


WHERE_UNIT = 0.1  # metres per unit of the where token's input: the table's distances become numbers of order 1


class FrozenEncoders:
    """The frozen VGGT and text encoder: plain attributes of the policy, not registered submodules."""

    def __init__(self, vggt: VGGTAggregator, language: LanguageEncoder) -> None:
        self.vggt = vggt
        self.language = language


class AtlasPolicy(PretrainedPolicy, nn.Module):
    """Frozen VGGT + frozen text encoder + trainable fusion and action head.

    `forward(batch)` returns `loss`, `pose_loss`, `gripper_loss`, `locate_loss` and metrics; `predict_action(obs)`
    returns an (action_horizon, 7) numpy chunk in LIBERO units with the gripper exactly -1 or +1 for one
    observation (`runtime.PolicyRuntime` runs it step by step in an episode).
    Saving and loading (`save_pretrained`, `from_pretrained`, ...) come from `PretrainedPolicy`.
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
                             action_horizon=config.action_horizon, extra_queries=int(config.locate_weight > 0))
        self.head = build_action_head(config.head, config.fusion.hidden_dim)
        D = config.fusion.hidden_dim
        self.stem = PixelStem(D, self.fusion.token_grid) if config.pixel_stem else None
        # the locate query's read-out: the goal object's and its target's xyz (OBJECT_POSITIONS)
        cell_dim = self.stem.channels if self.stem is not None else None
        self.locator = ((SpatialLocator(D, self.fusion.token_grid, cell_dim) if config.locate_readout == "spatial"
                         else LinearLocator(D)) if config.locate_weight > 0 else None)
        # locate_input: the hand-to-object and hand-to-target vectors (in WHERE_UNIT) -> one more context token
        self.where = nn.Sequential(nn.Linear(6, D), nn.GELU(), nn.Linear(D, D)) if config.locate_input else None
        # position always normalised; rotation kept raw when the head predicts quaternions; gripper raw
        quaternion = config.head.rotation_format == "quaternion"
        self._action_keep = (GRIPPER,) + (tuple(range(ROTATION.start, ROTATION.stop)) if quaternion else ())

    # --- devices -------------------------------------------------------------------------------

    # torch offers no public hook for moving tensors that are deliberately not submodules (registered ones
    # would reach the optimizer, DDP and state_dict): every .to()/.cuda()/.float() goes through _apply
    def _apply(self, fn, recurse: bool = True):
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

    def locating_parameters(self) -> list[nn.Parameter]:
        """The locate read-out's and the pixel stem's parameters (`training.locate_learning_rate` sets their rate)."""
        return [p for module in (self.locator, self.stem) if module is not None for p in module.parameters()]

    # --- forward -------------------------------------------------------------------------------

    def vision_features(self, images: Tensor) -> Tensor:
        """uint8 images (B, S, 3, H, W) -> the frozen VGGT's `vggt_layers` outputs as the fusion reads them
        (`Fusion.select_tokens`), stacked as (B, L, S, T, 2C): what a feature store holds and what a batch
        may carry under `OBS_VISION_FEATURES` instead of images."""
        if not self.config.freeze_vggt:
            raise ValueError("vision features can only be precomputed for a frozen backbone (model.freeze_vggt: true)")
        return torch.stack(self._frozen_layers(images), dim=1)

    def vision_feature_shape(self) -> tuple[int, int, int, int]:
        """The shape (L, S, T, 2C) of one sample's `vision_features`, known without running the backbone."""
        return (len(self.config.vggt_layers), self.config.sample_spec.num_views, self.fusion.tokens_per_view,
                2 * self.config.vggt.embed_dim)

    def _frozen_layers(self, images: Tensor) -> list[Tensor]:
        """The frozen VGGT's selected tokens (B, S, T, 2C) of each of `vggt_layers` for uint8 images (B, S, 3, H, W)."""
        images = images.to(self.device, non_blocking=True).float() / 255.0
        layers, patch_start_idx = self.frozen.vggt.encode(images, self.config.vggt_layers)
        return [self.fusion.select_tokens(layer, patch_start_idx) for layer in layers]

    def encode_observations(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Features of a batch: the frozen VGGT's selected tokens of each layer (run now, or precomputed under
        `OBS_VISION_FEATURES`), the pixel stem's tokens and cells of the images (None without `pixel_stem`),
        instruction tokens, normalised state."""
        if OBS_VISION_FEATURES in batch:
            layers = list(batch[OBS_VISION_FEATURES].to(self.device, non_blocking=True).unbind(1))
        elif self.config.freeze_vggt:  # the live path: no stacking, the layers go straight to the fusion
            layers = self._frozen_layers(batch[OBS_IMAGES])
        else:
            images = batch[OBS_IMAGES].to(self.device, non_blocking=True).float() / 255.0  # (B, S, 3, H, W)
            layers, patch_start_idx = self.vggt(images, self.config.vggt_layers)
            layers = [self.fusion.select_tokens(layer, patch_start_idx) for layer in layers]
        pixels = cells = None
        if self.stem is not None:
            if OBS_IMAGES not in batch:
                raise ValueError(f"model.pixel_stem reads the camera images, and this batch has none (keys: "
                                 f"{sorted(batch)})")
            pixels, cells = self.stem(batch[OBS_IMAGES].to(self.device, non_blocking=True))
        language, language_mask = self.frozen.language.encode(list(batch[INSTRUCTION]))
        observed = torch.as_tensor(batch[OBS_STATE], device=self.device).float()
        state = normalize(observed, self.norm_stats.state, self.config.normalization_mode)
        if not self.config.use_state:
            state = torch.zeros_like(state)
        return {"layers": layers, "pixels": pixels, "cells": cells, "language": language,
                "language_mask": language_mask, "state": state, "hand": observed[:, EEF_POSITION]}

    def _decode(self, encoded: Mapping[str, Any], truth: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The action queries' features (B, action_horizon, D) and, with a locate query, where it puts the goal's
        object and its target (B, 6; else None). The locate query decodes beside the action queries, or, with
        `locate_input`, first: the action queries then also read the where token (`_where_token`), made from `truth`
        (B, 6) where it is finite and from the located positions elsewhere."""
        context, padding = self.fusion.encode([layer.float() for layer in encoded["layers"]], encoded["language"],
                                              encoded["language_mask"], encoded["state"], encoded["pixels"])
        H = self.config.action_horizon
        if self.locator is None:
            return self.fusion.decode(context, padding), None
        # the current agent view's patch tokens and stem cells, for the spatial read-out
        patches = self.fusion.view_patches(context)
        cells = encoded["cells"][:, 0] if encoded["cells"] is not None else None
        if self.where is None:
            queries = self.fusion.decode(context, padding)
            return queries[:, :H], self.locator(queries[:, H], patches, cells)
        located = self.locator(self.fusion.decode(context, padding, self.fusion.queries[H:])[:, 0], patches, cells)
        given = located if truth is None else torch.where(torch.isfinite(truth), truth, located)
        where = self._where_token(given, encoded["hand"])
        context = torch.cat((context, where.unsqueeze(1)), dim=1)
        padding = torch.cat((padding, padding.new_zeros(padding.shape[0], 1)), dim=1)
        return self.fusion.decode(context, padding, self.fusion.queries[:H]), located

    def _where_token(self, located: Tensor, hand: Tensor) -> Tensor:
        """One context token (B, D) from the located goal object's and target's xyz (B, 6) and the end effector's (B, 3):
        the vectors from the hand to each, so that the same vector means the same move in every layout. The positions
        are detached: the action loss does not move the locator, whose outputs stay estimates of where things are."""
        vectors = (located.detach().view(-1, 2, 3) - hand.unsqueeze(1)).flatten(1) / WHERE_UNIT
        return self.where(vectors)

    def _truth(self, batch: Mapping[str, Any]) -> Tensor | None:
        """In training with `locate_input_truth`: the batch's `OBJECT_POSITIONS` (B, 6) for a drawn share of the
        samples, NaN (use the located) for the rest and wherever the batch knows none; else None."""
        share, known = self.config.locate_input_truth, batch.get(OBJECT_POSITIONS)
        if not (self.training and share and known is not None):
            return None
        known = torch.as_tensor(known, device=self.device).float()
        drawn = torch.rand(known.shape[0], 1, device=self.device) < share
        return torch.where(drawn, known, torch.full_like(known, float("nan")))

    def _locate_loss(self, located: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """Mean absolute error (metres) of the locate query's positions (B, 6) over the coordinates the batch knows
        (finite `OBJECT_POSITIONS`); zero, still connected to the locator, where it knows none."""
        known = batch.get(OBJECT_POSITIONS)
        target = (torch.as_tensor(known, device=self.device).float() if known is not None
                  else torch.full_like(located, float("nan")))
        mask = torch.isfinite(target)
        error = (located - torch.nan_to_num(target)).abs() * mask
        return error.sum() / mask.sum().clamp_min(1)

    def _to_head_units(self, actions: Tensor) -> Tensor:
        return normalize(actions, self.norm_stats.action, self.config.normalization_mode, keep=self._action_keep)

    def _from_head_units(self, actions: Tensor) -> Tensor:
        return unnormalize(actions, self.norm_stats.action, self.config.normalization_mode, keep=self._action_keep)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Losses and metrics of a batch (LIBERO units in, metrics in real and normalised units out); in
        training mode the normalised state gets `state_noise_std` Gaussian noise, and a `state_dropout` share of the
        samples gets no state (zero, as with `use_state: false`), and a `locate_input_truth` share gets hand-to-object
        vectors from the batch's `OBJECT_POSITIONS` (`_truth`); all drawn from torch's generator. `locate_loss` is the
        locate query's error in metres (`_locate_loss`; zero without `locate_weight`)."""
        encoded = self.encode_observations(batch)
        if self.training and self.config.use_state and self.config.state_noise_std:
            encoded["state"] = encoded["state"] + self.config.state_noise_std * torch.randn_like(encoded["state"])
        if self.training and self.config.use_state and self.config.state_dropout:
            state = encoded["state"]
            kept = torch.rand(state.shape[0], 1, device=state.device) >= self.config.state_dropout
            encoded["state"] = state * kept
        features, located = self._decode(encoded, self._truth(batch))  # (B, H, D), (B, 6) or None
        actions = torch.as_tensor(batch[ACTIONS], device=self.device).float()  # (B, H, 7)
        valid = ~torch.as_tensor(batch[ACTIONS_PAD_MASK], device=self.device)
        target = self._to_head_units(actions)
        losses = self.head.loss(features, target, valid)
        losses["locate_loss"] = self._locate_loss(located, batch) if located is not None else features.new_zeros(())
        loss = self.combined_loss(losses["pose_loss"], losses["gripper_loss"], losses["locate_loss"])
        with torch.no_grad():
            predicted = self.head.predict(features.detach())
            metrics = action_metrics(self._from_head_units(predicted), actions, valid)
            metrics.update(action_metrics(predicted, target, valid, suffix="_normalized"))
        return {"loss": loss, **losses, **metrics}

    def combined_loss(self, pose_loss: Any, gripper_loss: Any, locate_loss: Any) -> Any:
        """The training loss from its parts, each a mean over what it is scored on (the action losses over the valid
        action steps, the locate loss over the known coordinates): one batch's, or a whole split's from its means."""
        return (self.config.head.pose_loss_weight * pose_loss + self.config.head.gripper_loss_weight * gripper_loss
                + self.config.locate_weight * locate_loss)

    @torch.no_grad()
    def predict_action_chunk(self, batch: Mapping[str, Any]) -> Tensor:
        """(B, action_horizon, 7) actions in LIBERO units for a batch; gripper exactly -1 or +1."""
        features, _ = self._decode(self.encode_observations(batch))
        return self._from_head_units(self.head.predict(features))

    @torch.no_grad()
    def predict_action(self, observation: Mapping[str, Any]) -> np.ndarray:
        """One observation (`agentview_image`, `wrist_image` upright HWC uint8, `state` (8,),
        `task_description`) -> (action_horizon, 7) float array in LIBERO units, the observation taken as
        the first frame of an episode. A control loop uses `runtime.PolicyRuntime`, which keeps the
        episode's frames for temporal context and schedules the chunks."""
        with self._evaluating():
            batch = self._first_frame_batch(observation)
            return self.predict_action_chunk(batch)[0].cpu().numpy().astype(np.float64)

    @torch.no_grad()
    def locate(self, observation: Mapping[str, Any]) -> np.ndarray:
        """Where the locate query puts the goal's object and its target in one observation (as `predict_action`
        takes it): (2, 3) world xyz in metres, the object's row first. What `locate_input` hands the action queries,
        for checking the policy's sense of the scene against the simulator's poses; needs `locate_weight`."""
        if self.locator is None:
            raise ValueError("this policy has no locate query (model.locate_weight is 0)")
        with self._evaluating():
            _, located = self._decode(self.encode_observations(self._first_frame_batch(observation)))
            return located.view(2, 3).cpu().numpy().astype(np.float64)

    def _first_frame_batch(self, observation: Mapping[str, Any]) -> dict[str, Any]:
        """A batch of one: `observation` as the first frame of an episode."""
        history = ObservationHistory(self.config.sample_spec)
        history.add(observation)
        return batch_inputs([history.model_inputs()])

    @contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Evaluation mode inside the block, the previous mode restored after it."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    # --- what the frozen encoders are --------------------------------------------------------------------

    def backbone_references(self) -> dict[str, Any]:
        """What the frozen encoders were: ids and weight hashes, checked when the policy is loaded."""
        refs = {"language": {"model_name_or_path": self.config.language.model_name_or_path,
                             "revision": self.config.language.revision,
                             "weights_hash": self.frozen.language.weights_hash()}}
        if self.config.freeze_vggt:
            refs["vggt"] = {"pretrained": self.config.vggt_pretrained, "revision": self.config.vggt_revision,
                            "init_seed": self.config.vggt_init_seed, "weights_hash": self.frozen.vggt.weights_hash()}
        return refs

