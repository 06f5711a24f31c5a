"""Selection (DESIGN §4) against brute-force oracles on fresh random inputs."""
from __future__ import annotations

import pytest
import torch

from hybridkv_vllm.core.errors import ConfigError
from hybridkv_vllm.core.selection import (SelectionConfig, chunk_summaries, score_chunks, select_chunks,
                                          select_static, text_prior_scores)


def _greedy_static(scores, is_visual, budget, sel_len, cfg):
    """Oracle: pick one token at a time by the written priority rule."""
    left = set(range(sel_len))
    chosen = []
    for _ in range(min(budget, sel_len)):
        sinks = [i for i in left if i < cfg.sink_tokens]
        recent = [i for i in left if i >= sel_len - cfg.recent_tokens]
        text = [i for i in left if not is_visual[i]]
        if sinks:
            pick = min(sinks)
        elif recent:
            pick = max(recent)
        else:
            pool = text or list(left)
            best = max(float(scores[i]) for i in pool)
            pick = min(i for i in pool if float(scores[i]) == best)
        chosen.append(pick)
        left.remove(pick)
    return sorted(chosen)


@pytest.mark.parametrize("seed", range(6))
def test_select_static_matches_greedy_oracle(seed):
    gen = torch.Generator().manual_seed(seed)
    P = int(torch.randint(1, 120, (1,), generator=gen))
    sel_len = int(torch.randint(0, P + 1, (1,), generator=gen))
    budget = int(torch.randint(0, P + 10, (1,), generator=gen))
    # Coarse scores so ties happen.
    scores = torch.randint(0, 5, (P,), generator=gen).float()
    is_visual = torch.rand(P, generator=gen) < 0.6
    cfg = SelectionConfig(sink_tokens=int(torch.randint(0, 6, (1,), generator=gen)),
                          recent_tokens=int(torch.randint(0, 20, (1,), generator=gen)))
    got = select_static(scores, is_visual, budget, sel_len, cfg)
    assert got.dtype == torch.long
    assert got.tolist() == _greedy_static(scores, is_visual, budget, sel_len, cfg)
    assert len(got) == min(budget, sel_len)


@pytest.mark.parametrize("seed", range(4))
def test_text_before_visual_and_sinks_recent(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    P, sel_len = 96, 80
    scores = torch.rand(P, generator=gen)
    is_visual = torch.zeros(P, dtype=torch.bool)
    is_visual[10:70] = True
    scores[is_visual] += 10.0  # visual tokens score higher, text must still win
    cfg = SelectionConfig(sink_tokens=4, recent_tokens=8)
    n_text = int((~is_visual[:sel_len]).sum())
    budget = n_text + 5
    got = set(select_static(scores, is_visual, budget, sel_len, cfg).tolist())
    assert all(i in got for i in range(sel_len) if not is_visual[i])
    assert set(range(4)) <= got and set(range(sel_len - 8, sel_len)) <= got
    assert max(got) < sel_len and len(got) == budget


def test_select_static_edge_cases():
    cfg = SelectionConfig()
    empty = select_static(torch.zeros(0), torch.zeros(0, dtype=torch.bool), 5, 0, cfg)
    assert empty.shape == (0,) and empty.dtype == torch.long
    assert select_static(torch.ones(1), torch.ones(1, dtype=torch.bool), 3, 1, cfg).tolist() == [0]
    assert select_static(torch.rand(50), torch.zeros(50, dtype=torch.bool), 100, 48, cfg).tolist() == list(range(48))
    assert select_static(torch.rand(10), torch.zeros(10, dtype=torch.bool), 0, 10, cfg).numel() == 0
    with pytest.raises(ConfigError):
        select_static(torch.rand(10), torch.zeros(10, dtype=torch.bool), 3, 11, cfg)


def _oracle_text_prior(q_obs, k, q_pos, scale, kernel):
    Hq, W, D = q_obs.shape
    H, P, _ = k.shape
    G = Hq // H
    raw = torch.zeros(H, P, dtype=torch.float64)
    for j in range(Hq):
        for w in range(W):
            p = int(q_pos[w])
            logits = torch.tensor([float(q_obs[j, w].double() @ k[j // G, i].double()) * scale
                                   for i in range(p + 1)], dtype=torch.float64)
            raw[j // G, : p + 1] += torch.softmax(logits, dim=0)
    pooled = torch.empty_like(raw)
    left = kernel // 2
    for i in range(P):
        lo, hi = max(0, i - left), min(P, i - left + kernel)
        pooled[:, i] = raw[:, lo:hi].max(dim=1).values
    return pooled


@pytest.mark.parametrize("G,kernel", [(1, 7), (2, 1), (3, 4), (7, 5)])
def test_text_prior_scores_oracle(G, kernel):
    gen = torch.Generator().manual_seed(G * 10 + kernel)
    H, P, W, D = 2, 23, 5, 8
    q_obs = torch.randn(H * G, W, D, generator=gen)
    k = torch.randn(H, P, D, generator=gen)
    q_pos = torch.arange(P - W, P)
    got = text_prior_scores(q_obs, k, q_pos, D ** -0.5, pool_kernel=kernel)
    assert got.dtype == torch.float32 and got.shape == (H, P)
    torch.testing.assert_close(got.double(), _oracle_text_prior(q_obs, k, q_pos, D ** -0.5, kernel),
                               rtol=1e-5, atol=1e-6)


def test_chunk_summaries_and_quest_bound():
    gen = torch.Generator().manual_seed(7)
    H, G, S, D, cs = 2, 3, 37, 4, 8
    k = torch.randn(H, S, D, generator=gen)
    q = torch.randn(H * G, D, generator=gen)
    kmin, kmax = chunk_summaries(k, cs)
    assert kmin.shape == (H, 5, D)
    for h in range(H):
        for c in range(5):
            block = k[h, c * cs: (c + 1) * cs]
            assert torch.equal(kmin[h, c], block.min(dim=0).values)
            assert torch.equal(kmax[h, c], block.max(dim=0).values)
    scores = score_chunks(q, kmin, kmax)
    assert scores.shape == (H, 5)
    for h in range(H):
        for c in range(5):
            expect = sum(max(float(q[j, d] * kmin[h, c, d]), float(q[j, d] * kmax[h, c, d]))
                         for j in range(h * G, (h + 1) * G) for d in range(D))
            assert scores[h, c].item() == pytest.approx(expect, rel=1e-5, abs=1e-5)
            # upper bound on every key of the chunk, group-summed
            actual = (q[h * G:(h + 1) * G] @ k[h, c * cs:(c + 1) * cs].T).sum(dim=0)
            assert bool((actual <= scores[h, c] + 1e-4).all())


def _oracle_chunks(row, C, k, cfg):
    left, chosen = set(range(C)), []
    for _ in range(min(k, C)):
        sinks = [c for c in left if c < cfg.sink_chunks]
        recent = [c for c in left if c >= C - cfg.recent_chunks]
        if sinks:
            pick = min(sinks)
        elif recent:
            pick = max(recent)
        else:
            best = max(float(row[c]) for c in left)
            pick = min(c for c in left if float(row[c]) == best)
        chosen.append(pick)
        left.remove(pick)
    return sorted(chosen)


@pytest.mark.parametrize("seed", range(5))
def test_select_chunks_oracle_and_planted(seed):
    gen = torch.Generator().manual_seed(seed)
    H, C_max = 3, 20
    C = int(torch.randint(1, C_max + 1, (1,), generator=gen))
    k = int(torch.randint(0, C + 3, (1,), generator=gen))
    scores = torch.randint(0, 4, (H, C_max), generator=gen).float()
    cfg = SelectionConfig(sink_chunks=int(torch.randint(0, 3, (1,), generator=gen)),
                          recent_chunks=int(torch.randint(0, 3, (1,), generator=gen)))
    got = select_chunks(scores, C, k, cfg)
    assert got.shape == (H, min(k, C))
    for h in range(H):
        assert got[h].tolist() == _oracle_chunks(scores[h], C, k, cfg)
    # planted: one chunk far above the rest is chosen along with the sink and the newest chunk
    if C >= 4:
        planted = torch.rand(H, C, generator=gen)
        target = [1 + int(torch.randint(0, C - 2, (1,), generator=gen)) for _ in range(H)]
        for h, t in enumerate(target):
            planted[h, t] = 100.0
        sel = select_chunks(planted, C, 3, SelectionConfig())
        for h, t in enumerate(target):
            assert sel[h].tolist() == sorted({0, C - 1, t})


def test_select_chunks_edges():
    assert select_chunks(torch.rand(2, 4), 0, 3).shape == (2, 0)
    assert select_chunks(torch.rand(2, 4), 4, 10).tolist() == [[0, 1, 2, 3]] * 2
    assert select_chunks(torch.rand(2, 1), 1, 1).tolist() == [[0], [0]]
    with pytest.raises(ConfigError):
        select_chunks(torch.rand(2, 4), 5, 1)


def test_selection_config_errors():
    with pytest.raises(ConfigError, match="chunk_size=0"):
        SelectionConfig(chunk_size=0)
    with pytest.raises(ConfigError, match="sink_tokens=-1"):
        SelectionConfig(sink_tokens=-1)


def test_retrieval_chunks():
    from hybridkv_vllm.core.selection import retrieval_chunks

    # P = 40 (2 complete chunks + tail): budget 1 chunk -> 1; a budget past the prompt is capped at its chunks
    assert retrieval_chunks(16, 40, 16) == 1
    assert retrieval_chunks(32, 40, 16) == retrieval_chunks(64, 40, 16) == 2
    assert retrieval_chunks(0, 5, 16) == 0 and retrieval_chunks(31, 40, 16) == 1
    with pytest.raises(ConfigError):
        retrieval_chunks(-16, 40, 16)


def test_retrieval_units_split_chunks_and_keep_forced_spans_whole():
    from hybridkv_vllm.core.errors import ConfigError
    cfg = SelectionConfig(chunk_size=32, sink_chunks=1, recent_chunks=2, sub_chunks=4)
    units = cfg.retrieval_units()
    assert (units.chunk_size, units.sink_chunks, units.recent_chunks, units.sub_chunks) == (8, 4, 8, 1)
    whole = SelectionConfig(chunk_size=32, sub_chunks=1)
    assert whole.retrieval_units() == whole
    # the default: 8-token units where the chunk is a multiple of 8, else whole chunks
    assert [SelectionConfig(chunk_size=c).sub_chunks for c in (8, 16, 32, 4, 12)] == [1, 2, 4, 1, 1]
    for bad in (3, -1, 1.5):
        with pytest.raises(ConfigError, match="sub_chunks"):
            SelectionConfig(chunk_size=32, sub_chunks=bad)
