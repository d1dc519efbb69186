"""Small builders shared by the tests: tiny CPU configs and data (importable as `helpers`)."""

from __future__ import annotations

from pathlib import Path

from atlas_vla.models.config import DinoConfig, FusionConfig, LanguageConfig, PolicyConfig, VGGTConfig


def tiny_vggt_config() -> VGGTConfig:
    """The fixture-sized VGGT (embed 64, depth 2, 4 heads)."""
    return VGGTConfig(embed_dim=64, depth=2, num_heads=4, dino=DinoConfig(embed_dim=64, depth=2, num_heads=4))


def tiny_policy_config(**overrides) -> PolicyConfig:
    """A policy that builds and steps in well under a second on CPU: tiny random VGGT, real MiniLM."""
    values = dict(image_size=56, action_horizon=4, vggt=tiny_vggt_config(), vggt_pretrained=None, vggt_layers=[0, 1],
                  language=LanguageConfig("minilm"),
                  fusion=FusionConfig(hidden_dim=64, num_heads=4, encoder_depth=1, decoder_depth=1))
    values.update(overrides)
    return PolicyConfig(**values)


def synthetic_dataset(root: Path, num_episodes: int = 8) -> Path:
    """The synthetic demo dataset in `root` (written once per folder)."""
    from atlas_vla.data.synthetic import make_synthetic_libero

    path = root / f"synthetic-{num_episodes}"
    return path if path.exists() else make_synthetic_libero(path, num_episodes=num_episodes, image_size=64)
