"""Where the real-weight test models live (built by `make setup`), shared by the test folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def model_dir(name: str) -> Path:
    """``models/<name>``; a missing model is a broken set-up, so the test fails (it is not skipped)."""
    path = MODELS / name
    if not (path / "config.json").exists():
        pytest.fail(f"{path} is missing: `make setup` builds it")
    return path
