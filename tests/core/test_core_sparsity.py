"""Classification statistic (DESIGN §2): chunked == unchunked, constructed patterns, reference-length queries,
accumulator."""
from __future__ import annotations

import math

import pytest
import torch

from hybridkv_vllm.core.errors import ConfigError
from hybridkv_vllm.core.sparsity import (SparsityAccumulator, mass_concentration, reference_query_positions,
                                         selection_recall)


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


def _recall_oracle(q_obs, q_fut, k, obs_pos, fut_pos, ref, scale, keep):
    """One head and one query at a time, float64: pooled top-k of the window, then each following query's mass."""
    H, G = k.shape[1], q_obs.shape[1] // k.shape[1]

    def row(q, p, j, h):
        return torch.softmax((k[: p + 1, h].double() @ q.double()[j]) * scale, dim=0)

    out = torch.zeros(H, dtype=torch.float64)
    for h in range(H):
        pooled = torch.zeros(ref, dtype=torch.float64)
        for t, p in enumerate(obs_pos.tolist()):
            for j in range(h * G, (h + 1) * G):
                pooled[: p + 1] += row(q_obs[t], p, j, h)
        kept = set(torch.topk(pooled, math.ceil(keep * ref)).indices.tolist())
        total = 0.0
        for t, p in enumerate(fut_pos.tolist()):
            probs = sum(row(q_fut[t], p, j, h) for j in range(h * G, (h + 1) * G)) / G
            total += sum(float(probs[i]) for i in range(p + 1) if i in kept or i >= ref)
        out[h] = total / len(fut_pos)
    return out


@pytest.mark.parametrize("G,keep", [(1, 0.1), (2, 0.25), (7, 0.05)])
def test_selection_recall_matches_oracle(G, keep):
    gen = torch.Generator().manual_seed(G)
    H, D, ref, W = 2, 8, 40, 6
    k = torch.randn(ref + W + 3, H, D, generator=gen) * 2
    q = torch.randn(2 * W, H * G, D, generator=gen) * 2
    obs, fut = torch.arange(ref - W, ref), torch.arange(ref, ref + W)
    got = selection_recall(q[:W], q[W:], k, obs, fut, ref, D ** -0.5, keep=keep)
    torch.testing.assert_close(got, _recall_oracle(q[:W], q[W:], k, obs, fut, ref, D ** -0.5, keep),
                               rtol=0, atol=1e-5)


def _planted_prompt(gen, S=200, ref=160, n_visual=110, D=16, G=2):
    """Three KV heads over a prompt whose first ``n_visual`` tokens are visual:
    0 stable (every query aligns with the same spike key), 1 moving (the observation window looks at one key, the
    following text at another: a retrieval head), 2 diffuse (zero queries: uniform attention)."""
    u, w = torch.randn(D, generator=gen), torch.randn(D, generator=gen)
    u, w = u / u.norm(), w - (w @ u) * u / u.norm() ** 2
    w = w / w.norm()
    k = 0.1 * torch.randn(S, 3, D, generator=gen)
    a, b = torch.randperm(n_visual, generator=gen)[:2].tolist()
    k[a, 0] = 25.0 * u
    k[a, 1] = 25.0 * u
    k[b, 1] = 25.0 * w
    is_visual = torch.zeros(S, dtype=torch.bool)
    is_visual[:n_visual] = True
    obs, fut = reference_query_positions(is_visual, (ref,), window=32)[ref]
    q_obs, q_fut = torch.zeros(len(obs), 3 * G, D), torch.zeros(len(fut), 3 * G, D)
    q_obs[:, :2 * G] = 4.0 * u
    q_fut[:, :G] = 4.0 * u
    q_fut[:, G:2 * G] = 4.0 * w
    return q_obs, q_fut, k, obs, fut, ref


def test_constructed_patterns_classify():
    gen = torch.Generator().manual_seed(0)
    acc = SparsityAccumulator(num_layers=1, num_kv_heads=3, groups=(160,))
    for _ in range(2):
        q_obs, q_fut, k, obs, fut, ref = _planted_prompt(gen)
        acc.add(0, selection_recall(q_obs, q_fut, k, obs, fut, ref, 16 ** -0.5, keep=0.1), group=ref)
    scores = acc.scores()
    assert acc.num_prompts == 2
    assert scores[0, 0] > 0.95 and scores[0, 1] < 0.3 and scores[0, 2] < 0.5, scores
    from hybridkv_vllm.core.profile import ModelIdentity

    ident = ModelIdentity("Tiny", 1, 6, 3, 16, "sha256:" + "a" * 64)
    prof = acc.to_profile(ident, theta=0.9)
    assert prof.is_static.tolist() == [[True, False, False]]
    assert prof.classification.reference_tokens == (160,)
    assert prof.classification.statistic == "selection_recall@0.1"


def test_selection_recall_errors():
    k, q = torch.randn(20, 1, 4), torch.randn(2, 1, 4)
    with pytest.raises(ConfigError, match="keep"):
        selection_recall(q, q, k, torch.tensor([8, 9]), torch.tensor([10, 11]), 10, 1.0, keep=0.0)
    with pytest.raises(ConfigError, match="before ref"):
        selection_recall(q, q, k, torch.tensor([9, 10]), torch.tensor([11, 12]), 10, 1.0)
    with pytest.raises(ConfigError, match="at least one"):
        selection_recall(q[:0], q, k, torch.tensor([], dtype=torch.long), torch.tensor([10, 11]), 10, 1.0)


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


def test_reference_query_positions():
    vis = torch.zeros(100, dtype=torch.bool)
    got = reference_query_positions(vis, (40, 64, 92, 96), window=8)
    assert {r: (o.tolist(), f.tolist()) for r, (o, f) in got.items()} == {
        40: (list(range(32, 40)), list(range(40, 48))), 64: (list(range(56, 64)), list(range(64, 72))),
        92: (list(range(84, 92)), list(range(92, 100)))}                    # 96 + 8 > P: not reached
    vis[30:60] = True                                   # visual tokens are never queries
    got = reference_query_positions(vis, (40, 64, 92), window=8)
    assert {r: (o.tolist(), f.tolist()) for r, (o, f) in got.items()} == {
        64: ([60, 61, 62, 63], list(range(64, 72))), 92: (list(range(84, 92)), list(range(92, 100)))}
    vis[:] = True
    assert reference_query_positions(vis, (40,), window=8) == {}
    with pytest.raises(ConfigError, match="window"):
        reference_query_positions(vis, (4,), window=8)


def test_accumulator_weighs_reference_lengths_equally():
    """Per group the mean over the prompts that reached it, then the mean over groups: a length reached by one
    prompt weighs as much as one reached by three."""
    acc = SparsityAccumulator(1, 2, groups=(512, 4096))
    for v in (0.2, 0.4, 0.6):
        acc.add(0, torch.tensor([v, 1.0]), group=512)
    acc.add(0, torch.tensor([0.9, 0.0]), group=4096)
    torch.testing.assert_close(acc.scores(), torch.tensor([[(0.4 + 0.9) / 2, 0.5]], dtype=torch.float64))
    assert acc.prompts_per_group() == {512: 3, 4096: 1}
    with pytest.raises(ConfigError, match="groups"):
        acc.add(0, torch.tensor([0.1, 0.1]), group=1024)
    short = SparsityAccumulator(1, 2, groups=(512, 4096))
    short.add(0, torch.tensor([0.5, 0.5]), group=512)
    with pytest.raises(ConfigError, match=r"reference length\(s\) \[4096\]"):
        short.scores()


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
    assert prof.classification.statistic == "selection_recall@0.1"
    assert prof.classification.reference_tokens == ()


def test_from_hf_config_missing_field():
    from hybridkv_vllm.core.errors import ProfileError
    from hybridkv_vllm.core.profile import ModelIdentity

    with pytest.raises(ProfileError, match="hidden_size"):
        ModelIdentity.from_hf_config({"num_attention_heads": 4, "num_hidden_layers": 2})
