"""Fixtures for tests that run vLLM's CPU build in-process (slow: marked ``engine``)."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine_utils import MODEL, RUNNERS, model_runner, synthetic_profile


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL / "config.json").exists():
        pytest.fail(f"{MODEL} missing: run `make setup`")
    return MODEL


@pytest.fixture(scope="session")
def profile_path(tmp_path_factory) -> Path:
    return synthetic_profile(tmp_path_factory.mktemp("profile") / "synthetic.json")


@pytest.fixture(scope="session")
def shipped_profile() -> Path:
    return MODEL.parents[1] / "configs" / "profiles" / "smollm2-vl.json"


@pytest.fixture(params=RUNNERS)
def runner(request):
    """Each test using it runs under both of vLLM's model runners (engine_utils.RUNNERS)."""
    with model_runner(request.param):
        yield request.param
