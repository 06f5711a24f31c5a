"""Classification statistic (DESIGN §2): chunked == unchunked, constructed patterns, query set, accumulator."""
from __future__ import annotations

import math

import pytest
import torch

from hybridkv_vllm.core.errors import ConfigError
from hybridkv_vllm.core.profile import HeadProfile
from hybridkv_vllm.core.sparsity import SparsityAccumulator, mass_concentration, query_positions


def _oracle(q, k, q_pos, scale, mass):
    """One query and one head at a time: full softmax rows, Python k90."""
    T, Hq, D = q.shape
    H = k.shape[1]
    G = Hq // H
    out = torch.zeros(H, dtype=torch.float64)
    for t in range(T):
        p = int(q_pos[t])
        for h in range(H):
            rows = [torch.softmax((k[: p + 1, h].double() @ q[t, j].double()) * scale, dim=0)
                    for j in range(h * G, (h + 1) * G)]
            probs = sorted(torch.stack(rows).mean(dim=0).tolist(), reverse=True)
            acc, k90 = 0.0, 0
            for x in probs:
                acc += x
                k90 += 1
                if acc >= mass:
                    break
            out[h] += 1 - k90 / (p + 1)
    return out / T


@pytest.mark.parametrize("G,chunk", [(1, 3), (2, 64), (3, 1), (7, 5)])
def test_chunked_equals_unchunked(G, chunk):
    gen = torch.Generator().manual_seed(G)
    S, H, D, T = 41, 2, 8, 11
    k = torch.randn(S, H, D, generator=gen) * 2
    q = torch.randn(T, H * G, D, generator=gen) * 2
    q_pos = torch.sort(torch.randperm(S, generator=gen)[:T]).values
    got = mass_concentration(q, k, q_pos, D ** -0.5, mass=0.9, query_chunk=chunk)
    torch.testing.assert_close(got, _oracle(q, k, q_pos, D ** -0.5, 0.9), rtol=0, atol=1e-6)
    assert torch.equal(got, mass_concentration(q, k, q_pos, D ** -0.5, mass=0.9, query_chunk=T + 5))


def _planted_prompt(gen, S=160, n_visual=110, D=16, G=2):
    """KV head 0 concentrated (queries align with one spike key); KV head 1 diffuse (zero queries)."""
    u = torch.randn(D, generator=gen)
    u = u / u.norm()
    k = 0.1 * torch.randn(S, 2, D, generator=gen)
    spike = int(torch.randint(0, n_visual, (1,), generator=gen))
    k[spike, 0] = 25.0 * u
    is_visual = torch.zeros(S, dtype=torch.bool)
    is_visual[:n_visual] = True
    q_pos = query_positions(is_visual)
    q = torch.zeros(len(q_pos), 2 * G, D)
    q[:, :G] = 4.0 * u
    return q, k, q_pos


def test_constructed_patterns_classify():
    gen = torch.Generator().manual_seed(0)
    acc = SparsityAccumulator(num_layers=1, num_kv_heads=2)
    for _ in range(2):
        q, k, q_pos = _planted_prompt(gen)
        acc.update(0, q, k, q_pos, scale=16 ** -0.5)
    scores = acc.scores()
    assert acc.num_prompts == 2
    assert scores[0, 0] > 0.95 and scores[0, 1] < 0.2
    from hybridkv_vllm.core.profile import ModelIdentity

    ident = ModelIdentity("Tiny", 1, 4, 2, 16, "sha256:" + "a" * 64)
    prof = HeadProfile.from_scores(ident, scores, theta=0.9)
    assert prof.is_static.tolist() == [[True, False]]


def test_uniform_attention_score_by_hand():
    # zero queries -> uniform over n = p+1 keys -> k90 = ceil(0.9 n). n = 11 and 23 keep 0.9 n (9.9, 20.7) far
    # from an integer: with n = 10 or 20, 9 (18) fp32 probabilities 1/n sum to 0.9 only up to the rounding
    # direction of 1/n, so k90 would hinge on the last bit of the softmax.
    S, D = 24, 4
    k = torch.randn(S, 1, D)
    q_pos = torch.tensor([10, 22])
    got = mass_concentration(torch.zeros(2, 1, D), k, q_pos, 1.0)
    expect = ((1 - math.ceil(0.9 * 11) / 11) + (1 - math.ceil(0.9 * 23) / 23)) / 2
    assert got.item() == pytest.approx(expect, abs=1e-9)


def test_query_positions():
    vis = torch.zeros(50, dtype=torch.bool)
    assert query_positions(vis).tolist() == list(range(18, 50))
    vis[5:40] = True
    assert query_positions(vis).tolist() == list(range(40, 50))
    vis[:] = True
    assert query_positions(vis, obs_window=4).tolist() == [46, 47, 48, 49]
    assert query_positions(torch.zeros(3, dtype=torch.bool)).tolist() == [0, 1, 2]


def test_empty_and_errors():
    assert mass_concentration(torch.zeros(0, 2, 4), torch.randn(5, 2, 4), torch.zeros(0, dtype=torch.long),
                              1.0).tolist() == [0.0, 0.0]
    with pytest.raises(ConfigError):
        mass_concentration(torch.zeros(1, 3, 4), torch.randn(5, 2, 4), torch.tensor([1]), 1.0)
    with pytest.raises(ConfigError):
        mass_concentration(torch.zeros(1, 2, 4), torch.randn(5, 2, 4), torch.tensor([5]), 1.0)
    acc = SparsityAccumulator(2, 2)
    acc.add(0, torch.tensor([0.5, 0.7]))
    with pytest.raises(ConfigError, match="counts"):
        acc.scores()
    acc.add(1, torch.tensor([0.1, 0.3]))
    acc.add(1, torch.tensor([0.3, 0.5]))
    acc.add(0, torch.tensor([0.7, 0.9]))
    torch.testing.assert_close(acc.scores(), torch.tensor([[0.6, 0.8], [0.2, 0.4]], dtype=torch.float64))


def test_accumulator_to_profile(make_identity):
    ident = make_identity(num_layers=2, num_kv_heads=2)
    acc = SparsityAccumulator(2, 2)
    acc.add(0, torch.tensor([0.95, 0.2]))
    acc.add(1, torch.tensor([0.5, 0.91]))
    prof = acc.to_profile(ident, theta=0.9)
    assert prof.is_static.tolist() == [[True, False], [False, True]]
    assert prof.provenance["num_prompts"] == 1
    assert prof.classification.statistic == "mass_concentration@0.9"


def test_from_hf_config_missing_field():
    from hybridkv_vllm.core.errors import ProfileError
    from hybridkv_vllm.core.profile import ModelIdentity

    with pytest.raises(ProfileError, match="hidden_size"):
        ModelIdentity.from_hf_config({"num_attention_heads": 4, "num_hidden_layers": 2})
