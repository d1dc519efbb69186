"""Shared test fixtures: paths to the reference data and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """`../shared/fixtures`: reference data produced by the real systems (never edited)."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {SHARED_FIXTURES}")
    return SHARED_FIXTURES


@pytest.fixture(scope="session")
def sim_demos_dir(fixtures_dir: Path) -> Path:
    """60 real LIBERO simulator demonstrations in the LeRobot v2 layout."""
    return fixtures_dir / "libero" / "sim_demos"


@pytest.fixture(scope="session")
def observation_file(fixtures_dir: Path) -> Path:
    """One real LIBERO-Spatial observation (.npz: agentview_image, wrist_image, state, task_description)."""
    return fixtures_dir / "libero" / "sample_libero_spatial_observation.npz"
