"""HFLayerCache (reads HF's K/V in place of a copy) selects and attends exactly as core's CompressedLayerCache does."""
import pytest
import torch

from hybridkv_vllm.core import BudgetConfig, HeadProfile, ModelIdentity, make_policy
from hybridkv_vllm.core.reference import CompressedLayerCache
from hybridkv_vllm.hf.state import HFLayerCache


def profile(layers=2, kv=2, q=4, d=16):
    ident = ModelIdentity("Test", layers, q, kv, d, "sha256:" + "0" * 64)
    scores = torch.tensor([[0.95, 0.5]] * layers, dtype=torch.float64)
    return HeadProfile.from_scores(ident, scores, provenance={"created": "t", "tool_version": "t"})


@pytest.mark.parametrize("prompt_len", [37, 64, 81])
@pytest.mark.parametrize("name,budget", [("hybridkv", 0.3), ("hybridkv", 1.0), ("snapkv", 0.2), ("full", 1.0)])
def test_hf_layer_cache_matches_core(prompt_len, name, budget):
    torch.manual_seed(prompt_len)
    prof = profile()
    policy = make_policy(name, prof, BudgetConfig(budget))
    steps, h, hq, d = 40, 2, 4, 16
    k = torch.randn(prompt_len + steps, h, d)
    v = torch.randn(prompt_len + steps, h, d)
    q_obs = torch.randn(8, hq, d)
    vis = torch.zeros(prompt_len, dtype=torch.bool)
    vis[5:20] = True
    core = CompressedLayerCache(policy.rules(0, prompt_len), 0.25)
    ours = HFLayerCache(policy.rules(0, prompt_len), 0.25)
    core.prefill(k[:prompt_len], v[:prompt_len], vis, q_obs)
    ours.prefill(k[:prompt_len], v[:prompt_len], vis, q_obs)
    for s in range(prompt_len, prompt_len + steps):
        q = torch.randn(hq, d)
        out_core = core.decode(q, k[s], v[s])
        ours.sync(k[:s + 1], v[:s + 1])
        for a, b in zip(core.kept(q), ours.kept(q)):
            assert torch.equal(a, b)
        torch.testing.assert_close(ours.attend(q), out_core, atol=0, rtol=0)
