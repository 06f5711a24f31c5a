import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("HYBRIDKV_TEST_THREADS", "1")))

ROOT = Path(__file__).resolve().parents[2]


def model_dir(name: str) -> Path:
    path = ROOT / "models" / name
    if not (path / "config.json").exists():
        pytest.skip(f"{path} not built (make setup builds it)")
    return path
