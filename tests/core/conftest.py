"""Shared fixtures of the core tests: small model identities and profiles."""
from __future__ import annotations

import pytest
import torch

from hybridkv_vllm.core.profile import HeadProfile, ModelIdentity, fingerprint_of


def make_identity(num_layers: int = 3, num_q_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 8,
                  architecture: str = "TinyForCausalLM") -> ModelIdentity:
    fp = fingerprint_of({"architecture": architecture, "num_hidden_layers": num_layers,
                         "num_attention_heads": num_q_heads, "num_key_value_heads": num_kv_heads,
                         "head_dim": head_dim})
    return ModelIdentity(architecture=architecture, num_layers=num_layers, num_q_heads=num_q_heads,
                         num_kv_heads=num_kv_heads, head_dim=head_dim, fingerprint=fp)


def make_profile(identity: ModelIdentity | None = None, seed: int = 0, theta: float = 0.9) -> HeadProfile:
    identity = identity or make_identity()
    gen = torch.Generator().manual_seed(seed)
    scores = 0.8 + 0.2 * torch.rand(identity.num_layers, identity.num_kv_heads, generator=gen,
                                    dtype=torch.float64)
    return HeadProfile.from_scores(identity, scores.clamp(max=0.999), theta=theta,
                                   provenance={"created": "2026-01-01T00:00:00+00:00", "tool_version": "test",
                                               "num_prompts": 2})


@pytest.fixture(name="make_identity")
def make_identity_fixture():
    return make_identity


@pytest.fixture(name="make_profile")
def make_profile_fixture():
    return make_profile


@pytest.fixture
def identity() -> ModelIdentity:
    return make_identity()


@pytest.fixture
def profile(identity: ModelIdentity) -> HeadProfile:
    return make_profile(identity)
