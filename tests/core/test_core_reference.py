"""Reference attention and the compressed layer cache under every policy (DESIGN §5)."""
from __future__ import annotations

import pytest
import torch

from hybridkv_vllm.core.budgets import BudgetConfig
from hybridkv_vllm.core.errors import ConfigError
from hybridkv_vllm.core.policy import (POLICIES, HeadKind, HybridKVPolicy, StreamingPolicy, make_policy)
from hybridkv_vllm.core.profile import HeadProfile
from hybridkv_vllm.core.reference import CompressedLayerCache, dense_attention, sparse_decode_attention
from hybridkv_vllm.core.selection import SelectionConfig

D = 8
SCALE = D ** -0.5


def _oracle_attention(q, k, v, positions, kept=None):
    """Per query head, per query: masked softmax by loops (kept: per-KV-head sets, else causal)."""
    T, Hq, _ = q.shape
    H = k.shape[1]
    G = Hq // H
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    for t in range(T):
        for j in range(Hq):
            idx = list(range(positions[t] + 1)) if kept is None else kept[j // G].tolist()
            logits = torch.stack([q[t, j].double() @ k[i, j // G].double() for i in idx]) * SCALE
            w = torch.softmax(logits, dim=0)
            out[t, j] = sum(w[n] * v[i, j // G].double() for n, i in enumerate(idx))
    return out


@pytest.mark.parametrize("G", [1, 2, 3, 7])
def test_dense_attention_oracle(G):
    gen = torch.Generator().manual_seed(G)
    S, H, T = 13, 2, 4
    q, k, v = (torch.randn(T, H * G, D, generator=gen), torch.randn(S, H, D, generator=gen),
               torch.randn(S, H, D, generator=gen))
    got = dense_attention(q, k, v, SCALE)
    torch.testing.assert_close(got.double(), _oracle_attention(q, k, v, list(range(S - T, S))), atol=1e-5, rtol=0)
    got2 = dense_attention(q, k, v, SCALE, q_offset=2)
    torch.testing.assert_close(got2.double(), _oracle_attention(q, k, v, [2, 3, 4, 5]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("G", [1, 3])
def test_sparse_decode_oracle(G):
    gen = torch.Generator().manual_seed(10 + G)
    S, H = 30, 3
    q = torch.randn(H * G, D, generator=gen)
    k, v = torch.randn(S, H, D, generator=gen), torch.randn(S, H, D, generator=gen)
    kept = [torch.sort(torch.randperm(S, generator=gen)[: 1 + h * 5]).values for h in range(H)]
    got = sparse_decode_attention(q, k, v, kept, SCALE)
    torch.testing.assert_close(got.double(), _oracle_attention(q[None], k, v, [S - 1], kept)[0], atol=1e-5, rtol=0)
    full = sparse_decode_attention(q, k, v, [torch.arange(S)] * H, SCALE)
    torch.testing.assert_close(full, dense_attention(q[None], k, v, SCALE)[0], atol=1e-6, rtol=0)
    with pytest.raises(ConfigError):
        sparse_decode_attention(q, k, v, [torch.arange(0)] * H, SCALE)


def _mixed_profile(make_profile_fn, make_identity_fn, L, Hq, H, equal_weights):
    ident = make_identity_fn(num_layers=L, num_q_heads=Hq, num_kv_heads=H, head_dim=D)
    prof = make_profile_fn(ident)
    if not equal_weights:
        return prof
    # static heads with identical scores -> identical weights, so a 100 % budget keeps everything
    scores = torch.where(prof.is_static, torch.tensor(0.95, dtype=torch.float64),
                         torch.tensor(0.5, dtype=torch.float64))
    scores[0, 0], scores[-1, -1] = 0.95, 0.5  # at least one head of each type
    return HeadProfile.from_scores(ident, scores, theta=0.9)


def _run_generation(policy, layer, P, H, G, is_visual, steps, gen):
    k = torch.randn(P + steps, H, D, generator=gen)
    v = torch.randn(P + steps, H, D, generator=gen)
    q = torch.randn(P + steps, H * G, D, generator=gen)
    cache = CompressedLayerCache(policy.rules(layer, P), SCALE)
    cache.prefill(k[:P], v[:P], is_visual, q_obs=q[max(0, P - 32):P])
    outs, refs = [], []
    for t in range(P, P + steps):
        outs.append(cache.decode(q[t], k[t], v[t]))
        refs.append(dense_attention(q[t][None], k[: t + 1], v[: t + 1], SCALE)[0])
    return cache, torch.stack(outs), torch.stack(refs)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("G", [1, 2, 3, 7])
@pytest.mark.parametrize("P,visual", [(1, "none"), (5, "all"), (37, "mid"), (48, "none"), (70, "mid")])
def test_full_budget_equals_dense(name, G, P, visual, make_profile, make_identity):
    H, L = 2, 2
    gen = torch.Generator().manual_seed(P * 31 + G)
    prof = _mixed_profile(make_profile, make_identity, L, H * G, H, equal_weights=True)
    policy = make_policy(name, prof, BudgetConfig(1.0, block_size=16), SelectionConfig(chunk_size=16), seed=3)
    is_visual = torch.zeros(P, dtype=torch.bool)
    if visual == "all":
        is_visual[:] = True
    elif visual == "mid":
        is_visual[P // 4: P // 2] = True
    for layer in range(L):
        cache, out, ref = _run_generation(policy, layer, P, H, G, is_visual, steps=3, gen=gen)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert all(len(idx) == cache.length for idx in cache.kept(torch.randn(H * G, D)))


def test_hybridkv_low_budget_sets(make_profile, make_identity):
    gen = torch.Generator().manual_seed(5)
    H, G, P, cs = 2, 2, 150, 16
    ident = make_identity(num_layers=1, num_q_heads=H * G, num_kv_heads=H, head_dim=D)
    prof = HeadProfile.from_scores(ident, torch.tensor([[0.97, 0.3]], dtype=torch.float64))
    policy = HybridKVPolicy(prof, BudgetConfig(0.25, block_size=cs), SelectionConfig(chunk_size=cs, sub_chunks=1))
    rules = policy.rules(0, P)
    assert rules.kinds == (HeadKind.STATIC, HeadKind.DYNAMIC)
    is_visual = torch.zeros(P, dtype=torch.bool)
    is_visual[20:120] = True
    cache, out, _ = _run_generation(policy, 0, P, H, G, is_visual, steps=20, gen=gen)
    q = torch.randn(H * G, D, generator=gen)
    static, dynamic = cache.kept(q)
    S, p_al = cache.length, cs * (P // cs)
    b_static, b_dyn = int(rules.budgets[0]), int(rules.budgets[1])
    # static: selected prompt tokens (text first) + tail block + every generated token
    sel = static[static < p_al]
    assert len(sel) == b_static and torch.equal(static[len(sel):], torch.arange(p_al, S))
    text = [i for i in range(p_al) if not is_visual[i]]
    if b_static >= len(text):
        assert set(text) <= set(sel.tolist())
    # dynamic: budget whole prompt chunks (sink chunk + last complete prompt chunk + top scores) + the hot tail
    prompt_part = dynamic[dynamic < p_al]
    assert torch.equal(dynamic[len(prompt_part):], torch.arange(p_al, S))
    chunks = sorted({int(i) // cs for i in prompt_part})
    assert chunks[0] == 0 and chunks[-1] == P // cs - 1 and len(chunks) == b_dyn // cs
    assert len(prompt_part) == len(chunks) * cs
    assert torch.isfinite(out).all()


def test_baseline_budgets_fair_and_rules(make_profile, make_identity):
    ident = make_identity(num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=D)
    prof = make_profile(ident)
    cfg = BudgetConfig(0.2)
    hyb = make_policy("hybridkv", prof, cfg)
    for name in ("streaming", "snapkv", "random"):
        base = make_policy(name, prof, cfg)
        assert base.plan.fractions.sum().item() == pytest.approx(hyb.plan.fractions.sum().item())
        assert all(k is HeadKind.STATIC for k in base.rules(1, 100).kinds)


def test_streaming_and_random_selection(make_profile, make_identity):
    ident = make_identity(num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=D)
    prof = make_profile(ident)
    cfg, sel = BudgetConfig(0.25), SelectionConfig(sink_tokens=4)
    stream = make_policy("streaming", prof, cfg, sel)
    gen = torch.Generator().manual_seed(1)
    P = 130
    k, v = torch.randn(P, 1, D, generator=gen), torch.randn(P, 1, D, generator=gen)
    cache = CompressedLayerCache(stream.rules(0, P), SCALE)
    cache.prefill(k, v, torch.zeros(P, dtype=torch.bool))
    budget = int(stream.rules(0, P).budgets[0])
    assert cache.static_kept[0].tolist() == list(range(4)) + list(range(128 - (budget - 4), 128))
    rnd = [make_policy("random", prof, cfg, sel, seed=s) for s in (1, 1, 2)]
    kept = []
    for pol in rnd:
        c = CompressedLayerCache(pol.rules(0, P), SCALE)
        c.prefill(k, v, torch.zeros(P, dtype=torch.bool))
        kept.append(c.static_kept[0].tolist())
    assert kept[0] == kept[1] != kept[2] and len(kept[0]) == budget


def test_policy_errors(make_profile):
    prof = make_profile()
    with pytest.raises(ConfigError, match="block_size"):
        make_policy("hybridkv", prof, BudgetConfig(0.5, block_size=8), SelectionConfig(chunk_size=16))
    with pytest.raises(ConfigError, match="policy="):
        make_policy("h2o", prof, BudgetConfig(0.5))
    snap = make_policy("snapkv", prof, BudgetConfig(0.5))
    cache = CompressedLayerCache(snap.rules(0, 40), SCALE)
    with pytest.raises(ConfigError, match="q_obs"):
        cache.prefill(torch.randn(40, 2, D), torch.randn(40, 2, D), torch.zeros(40, dtype=torch.bool))
    with pytest.raises(ConfigError, match="prefill"):
        CompressedLayerCache(StreamingPolicy(3, 2, BudgetConfig(0.5)).rules(0, 4), SCALE).attend(torch.randn(4, D))


def test_policy_tokens_for_shapes(make_profile):
    prof = make_profile()
    for name in POLICIES:
        pol = make_policy(name, prof, BudgetConfig(0.3))
        tok = pol.tokens_for(200)
        assert tok.shape == (prof.num_layers, prof.num_kv_heads) and tok.dtype == torch.long
        assert torch.equal(pol.rules(1, 200).budgets, tok[1])


def test_cache_multi_token_append_and_explicit_obs_positions(make_profile, make_identity):
    gen = torch.Generator().manual_seed(9)
    ident = make_identity(num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=D)
    pol = make_policy("snapkv", make_profile(ident), BudgetConfig(1.0))
    P = 40
    k, v = torch.randn(P + 4, 2, D, generator=gen), torch.randn(P + 4, 2, D, generator=gen)
    q = torch.randn(P + 4, 4, D, generator=gen)
    cache = CompressedLayerCache(pol.rules(0, P), SCALE)
    cache.prefill(k[:P], v[:P], torch.zeros(P, dtype=torch.bool), q_obs=q[P - 8:P], q_obs_pos=torch.arange(P - 8, P))
    cache.append(k[P:P + 3], v[P:P + 3])
    out = cache.decode(q[P + 3], k[P + 3], v[P + 3])
    torch.testing.assert_close(out, dense_attention(q[P + 3][None], k, v, SCALE)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sub", [2, 4])
def test_sub_chunk_retrieval_units(sub, make_identity):
    """Retrieval finer than a block: a dynamic head keeps the same number of prompt tokens (whole blocks' worth) in
    ``chunk_size // sub`` -token units aligned to that unit, the sink block and the prompt's last complete block
    whole, the units scoring highest by the Quest bound, and the same hot tail; static heads do not change."""
    gen = torch.Generator().manual_seed(11)
    H, G, P, cs = 2, 2, 150, 16
    unit = cs // sub
    ident = make_identity(num_layers=1, num_q_heads=H * G, num_kv_heads=H, head_dim=D)
    prof = HeadProfile.from_scores(ident, torch.tensor([[0.97, 0.3]], dtype=torch.float64))
    whole = HybridKVPolicy(prof, BudgetConfig(0.5, block_size=cs), SelectionConfig(chunk_size=cs))
    fine = HybridKVPolicy(prof, BudgetConfig(0.5, block_size=cs), SelectionConfig(chunk_size=cs, sub_chunks=sub))
    k, v = torch.randn(P + 4, H, D, generator=gen), torch.randn(P + 4, H, D, generator=gen)
    q = torch.randn(P + 4, H * G, D, generator=gen)
    caches = []
    for policy in (whole, fine):
        cache = CompressedLayerCache(policy.rules(0, P), SCALE)
        cache.prefill(k[:P], v[:P], torch.zeros(P, dtype=torch.bool), q_obs=q[P - 32:P])
        for t in range(P, P + 4):
            cache.decode(q[t], k[t], v[t])
        caches.append(cache)
    (s_whole, d_whole), (s_fine, d_fine) = caches[0].kept(q[-1]), caches[1].kept(q[-1])
    assert torch.equal(s_whole, s_fine)                                      # static heads untouched
    p_al, S = cs * (P // cs), caches[1].length
    prompt = d_fine[d_fine < p_al]
    assert len(prompt) == len(d_whole[d_whole < p_al])                     # the same budget in tokens
    assert torch.equal(d_fine[len(prompt):], torch.arange(p_al, S))        # the same hot tail
    units = sorted({int(i) // unit for i in prompt})
    assert len(prompt) == len(units) * unit                                 # whole units
    assert set(range(sub)) <= set(units)                                    # the sink block, whole
    assert set(range(p_al // unit - sub, p_al // unit)) <= set(units)       # the last complete block, whole
    # the free units are the highest-scoring ones by the Quest bound (the oracle: score_chunks over the units)
    from hybridkv_vllm.core.selection import chunk_summaries, score_chunks
    kmin, kmax = chunk_summaries(k[:p_al, 1][None], unit)
    scores = score_chunks(q[-1][G:2 * G], kmin, kmax)[0]
    forced = set(range(sub)) | set(range(p_al // unit - sub, p_al // unit))
    free = [u for u in units if u not in forced]
    rest = [u for u in range(p_al // unit) if u not in units]
    assert free and rest and min(scores[free]) >= max(scores[rest])
