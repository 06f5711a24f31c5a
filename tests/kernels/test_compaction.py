"""compaction: in-place kept-token compaction and chunk summaries, Triton == reference."""
import pytest
import torch

from hybridkv_kernels import compaction
from kernel_testutil import gen, paged_cache, poison, seed_of

pytestmark = pytest.mark.triton

BS = 4
D = 16


def _kept(g, seqs, H, K):
    """Sorted random kept lists (sizes 0..K, including K: everything of a short request) + their counts."""
    B = len(seqs)
    kept = torch.full((B, H, K), -7, dtype=torch.int32)
    nk = torch.zeros(B, H, dtype=torch.int32)
    for b, s in enumerate(seqs):
        for h in range(H):
            n = min(s, int(torch.randint(0, K + 1, (), generator=g)))
            if h == 0:
                n = min(s, K)
            kept[b, h, :n] = torch.randperm(s, generator=g)[:n].sort().values.to(torch.int32)
            nk[b, h] = n
    return kept, nk


@pytest.mark.parametrize("H", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nb2", "cpu", "heads"])
def test_compact_matches_reference(H, dtype, layout, device):
    g = gen(seed_of(H, dtype, layout))
    seqs = [1, 5, 19]
    cache, kc, vc, table, dk, dv = paged_cache(g, seqs, H, D, BS, dtype, layout=layout, device=device)
    kept, nk = _kept(g, seqs, H, K=9)
    kept, nk = kept.to(device), nk.to(device)
    ref_cache = cache.clone()
    compaction.launch_compact(kc, vc, table, kept, nk)
    compaction.reference_compact(*__import__("hybridkv_kernels").sparse_decode.kv_views(ref_cache, layout, D),
                                 table, kept, nk)
    assert torch.equal(cache.cpu(), ref_cache.cpu())
    for b in range(len(seqs)):  # the semantics, directly: slot i now holds token kept[i]
        for h in range(H):
            for i in range(int(nk[b, h])):
                p = int(kept[b, h, i])
                blk = int(table[b, i // BS])
                assert torch.equal(kc[blk, i % BS, h].cpu(), dk[b][p, h].cpu())
                assert torch.equal(vc[blk, i % BS, h].cpu(), dv[b][p, h].cpu())


def test_compact_with_caller_workspace_and_per_head_table(device):
    g = gen(21)
    seqs = [13, 8]
    cache, kc, vc, table, _, _ = paged_cache(g, seqs, 2, D, BS, torch.float32, device=device)
    table3 = torch.stack([table, table], dim=1).contiguous()
    kept, nk = _kept(g, seqs, 2, K=6)
    kept, nk = kept.to(device), nk.to(device)
    ws = tuple(poison(t) for t in compaction.alloc_compact_workspace(kc, 2, 6))
    ref_cache = cache.clone()
    compaction.launch_compact(kc, vc, table3, kept, nk, workspace=ws)
    compaction.reference_compact(ref_cache[:, 0], ref_cache[:, 1], table, kept, nk)
    assert torch.equal(cache.cpu(), ref_cache.cpu())


@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_fp32", [True, False])  # summaries in fp32 or in the cache dtype (exact either way)
def test_summaries_match_reference(H, dtype, out_fp32, device):
    out_dtype = torch.float32 if out_fp32 else dtype
    g = gen(seed_of(H, dtype, out_fp32))
    seqs = [1, 4, 9]
    _, kc, _, table, dk, _ = paged_cache(g, seqs, H, D, BS, dtype, device=device)
    seq = torch.tensor(seqs, dtype=torch.int32, device=device)
    NB = kc.shape[0]
    got = [poison(torch.empty(NB, H, D, dtype=out_dtype, device=device)) for _ in range(2)]
    ref = [t.clone() for t in got]
    compaction.summaries_from_table(kc, table, seq, *got, backend="triton")
    compaction.summaries_from_table(kc, table, seq, *ref, backend="torch")
    for a, b in zip(got, ref):
        assert torch.equal(a.cpu().nan_to_num(3.0), b.cpu().nan_to_num(3.0))  # untouched blocks stay poisoned
    kmin, kmax = (t.float().cpu() for t in got)
    for b, s in enumerate(seqs):  # the semantics: min/max over the tokens each block holds
        for j in range(-(-s // BS)):
            blk = int(table[b, j])
            toks = dk[b][j * BS: min(s, (j + 1) * BS)].float().cpu()
            assert torch.equal(kmin[blk], toks.amin(0).to(out_dtype).float())
            assert torch.equal(kmax[blk], toks.amax(0).to(out_dtype).float())


def test_summaries_listed_blocks_only_and_skips(device):
    """Explicit ``[N, H]`` entries: negative ids and zero counts are skipped; only listed blocks change."""
    g = gen(33)
    _, kc, _, table, _, _ = paged_cache(g, [16], 2, D, BS, torch.float32, device=device)
    ids = torch.tensor([[int(table[0, 1]), -1], [int(table[0, 2]), int(table[0, 3])]], dtype=torch.int32, device=device)
    nt = torch.tensor([[4, 4], [0, 2]], dtype=torch.int32, device=device)
    got = [poison(torch.empty(kc.shape[0], 2, D, device=device)) for _ in range(2)]
    ref = [t.clone() for t in got]
    compaction.launch_summaries(kc, ids, nt, *got)
    compaction.reference_summaries(kc, ids, nt, *ref)
    for a, b in zip(got, ref):
        assert torch.equal(a.cpu().nan_to_num(3.0), b.cpu().nan_to_num(3.0))
    assert int((~got[0].isnan()).all(-1).sum()) == 2  # (blk1, h0) and (blk3, h1)
