import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("HYBRIDKV_TEST_THREADS", "1")))

MODELS = Path(__file__).resolve().parents[2] / "models"


def model_dir(name: str) -> Path:
    path = MODELS / name
    if not (path / "config.json").exists():
        pytest.skip(f"{path} not built (make setup builds it)")
    return path


@pytest.fixture(scope="session")
def tiny_vl():
    from hybridkv_vllm.hf.inputs import load_model

    return load_model(model_dir("tiny-vl"))


@pytest.fixture(scope="session")
def smollm2_vl():
    from hybridkv_vllm.hf.inputs import load_model

    return load_model(model_dir("smollm2-vl"))


@pytest.fixture(scope="session")
def smollm2():
    from hybridkv_vllm.hf.inputs import load_model

    return load_model(model_dir("smollm2-135m"))
