"""A valid head profile with random head types, for tests and benchmarks that need one without profiling."""
from __future__ import annotations

from pathlib import Path

import torch

from hybridkv_vllm.core.profile import HeadProfile, ModelIdentity


def synthetic_profile(path: Path, model: Path, seed: int = 0, low: float = 0.8) -> Path:
    """Write a profile for ``model`` whose scores are drawn uniformly from [low, 1) (θ = 0.9: about half static)."""
    from transformers import AutoConfig

    identity = ModelIdentity.from_hf_config(AutoConfig.from_pretrained(model))
    g = torch.Generator().manual_seed(seed)
    scores = low + (1 - low) * torch.rand(identity.num_layers, identity.num_kv_heads, generator=g,
                                          dtype=torch.float64) * 0.999
    HeadProfile.from_scores(identity, scores, theta=0.9).save(path)
    return path
