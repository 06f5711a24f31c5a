"""chunk_scoring: Triton launcher == PyTorch reference (indices, block ids, token counts), poisoned outputs."""
import pytest
import torch

from hybridkv_kernels import chunk_scoring
from hybridkv_kernels.compaction import reference_summaries, table_entries
from kernel_testutil import gen, paged_cache, poison, randn, seed_of

pytestmark = pytest.mark.triton

HEADS = [(2, 2), (4, 2), (7, 1)]  # GQA ratios 1, 2, 7
CS = 4  # chunk == block size
SEQS = [1, 4, 5, 16, 23]  # a single token, exact chunk edges, one past an edge, a partial tail


def _setup(seed, Hq, H, dtype, device, seqs=SEQS, D=16):
    g = gen(seed)
    _, kc, _, table, _, _ = paged_cache(g, seqs, H, D, CS, dtype, device=device)
    NB = kc.shape[0]
    kmin = torch.zeros(NB, H, D, device=device)
    kmax = torch.zeros(NB, H, D, device=device)
    ids, nt = table_entries(table, torch.tensor(seqs, dtype=torch.int32, device=device), CS)
    reference_summaries(kc, ids, nt, kmin, kmax)
    q = randn(g, len(seqs), Hq, D, dtype=dtype, device=device)
    return q, kmin, kmax, table, torch.tensor(seqs, dtype=torch.int32, device=device)


def _run_both(q, kmin, kmax, table, seq, k, **kw):
    B, H = q.shape[0], kmin.shape[1]
    out = poison(torch.empty(B, H, k, dtype=torch.int32, device=q.device))
    ids = poison(torch.empty_like(out))
    ntok = poison(torch.empty(B, H, dtype=torch.int32, device=q.device))
    chunk_scoring.launch(q, kmin, kmax, table, seq, k, out, chunk_size=CS, out_block_ids=ids, out_num_tokens=ntok, **kw)
    ref = chunk_scoring.reference(q, kmin, kmax, table, seq, k, chunk_size=CS, **kw)
    return (out, ids, ntok), ref


@pytest.mark.parametrize("Hq,H", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 3, 9])  # 9 > every request's chunk count: budget larger than the context
def test_select_matches_reference(Hq, H, dtype, k, device):
    q, kmin, kmax, table, seq = _setup(seed_of(Hq, H, dtype, k), Hq, H, dtype, device)
    got, ref = _run_both(q, kmin, kmax, table, seq, k)
    for a, b in zip(got, ref):
        assert torch.equal(a.cpu(), b.cpu())
    out = got[0].cpu()
    n_chunks = (seq.cpu() + CS - 1) // CS
    for b in range(q.shape[0]):
        n_sel = min(k, int(n_chunks[b]))
        assert (out[b, :, n_sel:] == -1).all()
        assert (out[b, :, :n_sel] < n_chunks[b]).all()
        if n_sel:
            assert (out[b, :, 0] == 0).all()  # the sink chunk
        if k >= 2:
            assert (out[b, :, n_sel - 1] == n_chunks[b] - 1).all()  # the newest chunk
    # with the newest chunk selected, the token count is exact: full chunks + the partial tail
    if k >= 2:
        tail = seq.cpu() - (n_chunks - 1) * CS
        n_sel = torch.clamp(n_chunks, max=k)
        assert torch.equal(got[2].cpu(), ((n_sel - 1) * CS + tail)[:, None].expand_as(got[2]).to(torch.int32))


@pytest.mark.parametrize("sink,recent", [(0, 0), (2, 2), (0, 3)])
def test_sink_recent_variants(sink, recent, device):
    q, kmin, kmax, table, seq = _setup(7 + sink * 10 + recent, 4, 2, torch.float32, device)
    got, ref = _run_both(q, kmin, kmax, table, seq, 3, sink_chunks=sink, recent_chunks=recent)
    for a, b in zip(got, ref):
        assert torch.equal(a.cpu(), b.cpu())


def test_per_head_table_and_small_score_tile(device):
    """A ``[B, H, M]`` table (each head its own blocks) and several score tiles per row."""
    q, kmin, kmax, table, seq = _setup(11, 4, 2, torch.float32, device, seqs=[3, 40, 61])
    table3 = torch.stack([table, table.flip(1)], dim=1).contiguous()
    B, H, k = 3, 2, 5
    out = poison(torch.empty(B, H, k, dtype=torch.int32, device=device))
    chunk_scoring.launch(q, kmin, kmax, table3, seq, k, out, chunk_size=CS, block_c=4)
    ref = chunk_scoring.reference(q, kmin, kmax, table3, seq, k, chunk_size=CS)[0]
    assert torch.equal(out.cpu(), ref.cpu())


def test_ties_go_to_lower_index(device):
    """Equal scores (identical summaries, and -0.0 vs 0.0): the lower chunk index wins."""
    B, Hq, H, D, M = 1, 2, 1, 16, 8
    kmin = torch.zeros(M, H, D, device=device)
    kmax = torch.zeros(M, H, D, device=device)
    kmax[5] = 1.0  # only chunk 5 scores above 0
    q = torch.ones(B, Hq, D, device=device)
    q[0, 1] = -0.0
    table = torch.arange(M, dtype=torch.int32, device=device)[None]
    seq = torch.tensor([M * CS], dtype=torch.int32, device=device)
    got, ref = _run_both(q, kmin, kmax, table, seq, 4)
    assert got[0].cpu().tolist() == [[[0, 1, 5, 7]]] == ref[0].cpu().tolist()


def test_run_dispatch_reference_path():
    """``run(backend='torch')`` writes the caller's buffers exactly like the reference."""
    q, kmin, kmax, table, seq = _setup(3, 4, 2, torch.float32, "cpu")
    out = poison(torch.empty(5, 2, 3, dtype=torch.int32))
    ids, nt = poison(torch.empty_like(out)), poison(torch.empty(5, 2, dtype=torch.int32))
    chunk_scoring.run(q, kmin, kmax, table, seq, 3, out, chunk_size=CS, out_block_ids=ids, out_num_tokens=nt,
                      backend="torch")
    ref = chunk_scoring.reference(q, kmin, kmax, table, seq, 3, chunk_size=CS)
    assert all(torch.equal(a, b) for a, b in zip((out, ids, nt), ref))
