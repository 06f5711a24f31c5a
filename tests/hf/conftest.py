import os

import pytest
import torch

from testing_models import model_dir

torch.set_num_threads(int(os.environ.get("HYBRIDKV_TEST_THREADS", "1")))


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
