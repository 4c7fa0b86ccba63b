"""Shared fixtures: seeded RNG, paths to the real data in ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """The real datasets (CIFAR-10 test, CamVid, ...); CI has them beside the repo."""
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"real test data expected at {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA
