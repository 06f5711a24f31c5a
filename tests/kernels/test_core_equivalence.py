"""The kernels' references (and the Triton launchers) agree with ``hybridkv_vllm.core`` (DESIGN §4, §5).

The core is head-major and one request at a time; the kernels are paged and batched. The core is imported
normally: a broken core fails these tests, it does not skip them.
"""
import pytest
import torch

from hybridkv_kernels import chunk_scoring, compaction, sparse_decode, text_prior
from hybridkv_vllm.core import reference as core_reference
from hybridkv_vllm.core import selection
from kernel_testutil import gen, paged_cache, randn, seed_of

pytestmark = pytest.mark.triton

BS = 4
D = 16


def _one_request(seed, S, Hq, H, device, extra_table=2):
    g = gen(seed)
    _, kc, vc, table, dk, dv = paged_cache(g, [S], H, D, BS, torch.float32, extra_blocks=5, device=device)
    n_blocks = table.shape[1]
    # pad the table with unused entries: the kernels must ignore chunks past the request's length
    spare = torch.arange(kc.shape[0] - extra_table, kc.shape[0], dtype=torch.int32, device=device)
    table = torch.cat([table, spare[None]], dim=1)
    q = randn(g, 1, Hq, D, device=device)
    return g, kc, vc, table, dk[0], dv[0], q, n_blocks


@pytest.mark.parametrize("Hq,H", [(2, 2), (4, 2), (7, 1)])
@pytest.mark.parametrize("S", [1, 8, 13])
def test_chunk_pipeline_matches_core(Hq, H, S, device):
    """summaries -> scores -> top-k: kernels == core chunk_summaries / score_chunks / select_chunks."""
    _, kc, vc, table, k, v, q, C = _one_request(seed_of(Hq, H, S), S, Hq, H, device)
    seq = torch.tensor([S], dtype=torch.int32, device=device)
    kmin = torch.zeros(kc.shape[0], H, D, device=device)
    kmax = torch.zeros_like(kmin)
    compaction.summaries_from_table(kc, table, seq, kmin, kmax, backend="triton")
    cmin, cmax = selection.chunk_summaries(k.transpose(0, 1).cpu(), BS)  # [H, C, D]
    tab = table[0, :C].long()
    torch.testing.assert_close(kmin[tab].transpose(0, 1).cpu(), cmin)
    torch.testing.assert_close(kmax[tab].transpose(0, 1).cpu(), cmax)

    scores = chunk_scoring.reference_scores(q, kmin, kmax, table)[0]  # [H, M]
    core_scores = selection.score_chunks(q[0].cpu(), cmin, cmax)
    torch.testing.assert_close(scores[:, :C].cpu(), core_scores, atol=1e-5, rtol=1e-5)

    for k_sel in (1, 2, 3, C + 2):
        for sink, recent in ((1, 1), (2, 1), (0, 2)):
            cfg = selection.SelectionConfig(chunk_size=BS, sink_chunks=sink, recent_chunks=recent)
            want = selection.select_chunks(scores.cpu(), C, k_sel, cfg)  # [H, min(k, C)]
            ref = chunk_scoring.reference(q, kmin, kmax, table, seq, k_sel, chunk_size=BS, sink_chunks=sink,
                                          recent_chunks=recent)[0][0]
            out = torch.empty(1, H, k_sel, dtype=torch.int32, device=device)
            chunk_scoring.launch(q, kmin, kmax, table, seq, k_sel, out, chunk_size=BS, sink_chunks=sink,
                                 recent_chunks=recent)
            n = want.shape[1]
            assert torch.equal(ref[:, :n].cpu().long(), want), (k_sel, sink, recent)
            assert torch.equal(out[0, :, :n].cpu().long(), want), (k_sel, sink, recent)
            assert (ref[:, n:] == -1).all()


@pytest.mark.parametrize("Hq,H", [(2, 2), (4, 2), (7, 1)])
@pytest.mark.parametrize("S", [1, 9, 16])
def test_dynamic_decode_matches_core(Hq, H, S, device):
    """Selected chunks -> block lists -> sparse decode == core.reference.sparse_decode_attention on their tokens."""
    _, kc, vc, table, k, v, q, C = _one_request(seed_of("dyn", Hq, H, S), S, Hq, H, device)
    seq = torch.tensor([S], dtype=torch.int32, device=device)
    kmin = torch.zeros(kc.shape[0], H, D, device=device)
    kmax = torch.zeros_like(kmin)
    compaction.summaries_from_table(kc, table, seq, kmin, kmax, backend="triton")
    K = 3
    idx = torch.empty(1, H, K, dtype=torch.int32, device=device)
    ids, ntok = torch.empty_like(idx), torch.empty(1, H, dtype=torch.int32, device=device)
    chunk_scoring.launch(q, kmin, kmax, table, seq, K, idx, chunk_size=BS, out_block_ids=ids, out_num_tokens=ntok)
    kept = []
    for h in range(H):
        chunks = [int(c) for c in idx[0, h] if c >= 0]
        kept.append(torch.cat([torch.arange(c * BS, min(S, (c + 1) * BS)) for c in chunks]))
    want = core_reference.sparse_decode_attention(q[0].cpu(), k.cpu(), v.cpu(), kept, 0.3)
    out = torch.empty_like(q)
    sparse_decode.launch(q, kc, vc, ids, ntok, 0.3, out, num_splits=2, block_n=8)
    torch.testing.assert_close(out[0].cpu(), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(sparse_decode.reference(q, kc, vc, ids, ntok, 0.3)[0].cpu(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("Hq,H", [(4, 2), (7, 1)])
@pytest.mark.parametrize("P,S,n_blocks", [(14, 17, 2), (16, 16, 1), (9, 12, 2)])
def test_static_pipeline_matches_core(Hq, H, P, S, n_blocks, device):
    """text prior -> select_static -> compaction -> ``table[:nB] ++ table[P//bs:]`` -> sparse decode == core."""
    g, kc, vc, table, k, v, q, C = _one_request(seed_of("static", Hq, H, P, S), S, Hq, H, device)
    W = 4
    q_obs = randn(g, W, Hq, D, device=device)
    q_pos = torch.arange(P - W, P, dtype=torch.int32, device=device)
    raw = torch.empty(H, P, device=device)
    text_prior.launch(q_obs, k[:P].contiguous(), q_pos, 0.3, raw)
    cfg = selection.SelectionConfig(chunk_size=BS, sink_tokens=1, recent_tokens=2, pool_kernel=3)
    want_scores = selection.text_prior_scores(q_obs.transpose(0, 1).cpu(), k[:P].transpose(0, 1).cpu(),
                                              q_pos.long().cpu(), 0.3, pool_kernel=3)
    scores = text_prior.pool(raw.cpu(), 3)
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-5)

    P_al = BS * (P // BS)
    budget = min(P_al, n_blocks * BS)
    is_visual = torch.zeros(P, dtype=torch.bool)
    is_visual[2:P - 3] = True
    sel = [selection.select_static(want_scores[h], is_visual, budget, P_al, cfg) for h in range(H)]
    kept_t = torch.full((1, H, budget), -1, dtype=torch.int32)
    for h in range(H):
        kept_t[0, h, : len(sel[h])] = sel[h].to(torch.int32)
    nk = torch.tensor([[len(s) for s in sel]], dtype=torch.int32)
    compaction.launch_compact(kc, vc, table, kept_t.to(device), nk.to(device))

    nB = budget // BS
    tail = list(range(P // BS, -(-S // BS)))
    blocks = table[0, list(range(nB)) + tail]
    ids = blocks[None, None, :].expand(1, H, len(blocks)).contiguous()
    ntok = torch.full((1, H), nB * BS + S - (P // BS) * BS, dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    sparse_decode.launch(q, kc, vc, ids, ntok, 0.3, out, num_splits=2, block_n=4)
    kept = [torch.cat([s, torch.arange(P_al, S)]) for s in sel]
    want = core_reference.sparse_decode_attention(q[0].cpu(), k.cpu(), v.cpu(), kept, 0.3)
    torch.testing.assert_close(out[0].cpu(), want, atol=2e-5, rtol=1e-5)
