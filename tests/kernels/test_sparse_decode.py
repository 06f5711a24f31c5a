"""sparse_decode: Triton launcher == PyTorch reference over explicit block lists, every layout, split-K on/off."""
import pytest
import torch

from hybridkv_kernels import sparse_decode
from kernel_testutil import TOL, gen, paged_cache, poison, randn, seed_of

pytestmark = pytest.mark.triton

HEADS = [(2, 2), (4, 2), (7, 1)]
BS = 4
D = 16


def _lists(g, table, seq_lens, H, L, device):
    """Per-(request, head) block lists: a random subset of each request's full blocks (in order) + its last block,
    so the last listed block may be partial; ``-1`` padding after the used entries."""
    B = table.shape[0]
    ids = torch.full((B, H, L), -1, dtype=torch.int32)
    ntok = torch.zeros(B, H, dtype=torch.int32)
    for b, s in enumerate(seq_lens):
        n_blocks = -(-s // BS)
        for h in range(H):
            full = [j for j in range(n_blocks - 1) if torch.rand((), generator=g) < 0.6][: L - 1]
            chosen = full + ([n_blocks - 1] if n_blocks else [])
            ids[b, h, : len(chosen)] = table[b, chosen].cpu()
            ntok[b, h] = len(full) * BS + (s - (n_blocks - 1) * BS if n_blocks else 0)
    return ids.to(device), ntok.to(device)


def _check(q, kc, vc, ids, ntok, out_dtype, **kw):
    out = poison(torch.empty(q.shape, dtype=out_dtype, device=q.device))
    sparse_decode.launch(q, kc, vc, ids, ntok, 0.37, out, block_n=8, **kw)
    ref = sparse_decode.reference(q, kc, vc, ids, ntok, 0.37)
    atol, rtol = TOL[q.dtype]
    assert not out.isnan().any()
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("Hq,H", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
def test_sparse_decode_matches_reference(Hq, H, dtype, splits, device):
    g = gen(seed_of(Hq, H, dtype, splits))
    seqs = [1, 4, 5, 13, 26]  # single token, block edge, one past, partial tails
    _, kc, vc, table, _, _ = paged_cache(g, seqs, H, D, BS, dtype, device=device)
    ids, ntok = _lists(g, table, seqs, H, L=6, device=device)
    q = randn(g, len(seqs), Hq, D, dtype=dtype, device=device)
    _check(q, kc, vc, ids, ntok, dtype, num_splits=splits)


@pytest.mark.parametrize("layout", ["nb2", "flash", "cpu", "heads"])
def test_layouts(layout, device):
    g = gen(seed_of(layout))
    seqs = [9, 16]
    _, kc, vc, table, _, _ = paged_cache(g, seqs, 2, D, BS, torch.float32, layout=layout, device=device)
    ids, ntok = _lists(g, table, seqs, 2, L=4, device=device)
    q = randn(g, 2, 4, D, device=device)
    _check(q, kc, vc, ids, ntok, torch.float32, num_splits=2)


def test_edge_token_counts(device):
    """0 tokens (-> 0), counts past ``L * bs`` (clamped), many splits for few tokens (empty splits), fp32 out."""
    g = gen(5)
    _, kc, vc, table, _, _ = paged_cache(g, [16, 16], 2, D, BS, torch.bfloat16, device=device)
    ids = table[:, None, :].expand(2, 2, 4).contiguous()
    ntok = torch.tensor([[0, 1], [16, 99]], dtype=torch.int32, device=device)
    q = randn(g, 2, 4, D, dtype=torch.bfloat16, device=device)
    out = poison(torch.empty(2, 4, D, device=device))
    sparse_decode.launch(q, kc, vc, ids, ntok, 0.5, out, num_splits=5, block_n=4)
    ref = sparse_decode.reference(q, kc, vc, ids, ntok, 0.5)
    assert (out[0, :2] == 0).all()
    torch.testing.assert_close(out.cpu(), ref.float().cpu(), atol=2e-2, rtol=2e-2)


def test_all_blocks_equals_dense_attention(device):
    """Listing every block of a request == dense attention over its context (the dense baseline)."""
    g = gen(6)
    seqs = [7, 18]
    _, kc, vc, table, dk, dv = paged_cache(g, seqs, 2, D, BS, torch.float32, device=device)
    ids = table[:, None, :].expand(2, 2, table.shape[1]).contiguous()
    ntok = torch.tensor(seqs, dtype=torch.int32, device=device)[:, None].expand(2, 2).contiguous()
    q = randn(g, 2, 4, D, device=device)
    out = poison(torch.empty_like(q))
    sparse_decode.launch(q, kc, vc, ids, ntok, 0.25, out, workspace=sparse_decode.Workspace.alloc(2, 4, D, 2, device))
    for b, s in enumerate(seqs):
        qb = q[b].view(2, 2, D).float()
        p = torch.softmax(torch.einsum("hgd,shd->hgs", qb, dk[b].float()) * 0.25, -1)
        dense = torch.einsum("hgs,shd->hgd", p, dv[b].float()).reshape(4, D)
        torch.testing.assert_close(out[b].cpu(), dense.cpu(), atol=2e-5, rtol=1e-5)


def test_run_dispatch_reference_path():
    g = gen(8)
    _, kc, vc, table, _, _ = paged_cache(g, [10], 1, D, BS, torch.float32)
    ids, ntok = _lists(g, table, [10], 1, L=3, device="cpu")
    q = randn(g, 1, 2, D)
    out = poison(torch.empty_like(q))
    sparse_decode.run(q, kc, vc, ids, ntok, 0.3, out, backend="torch")
    assert torch.equal(out, sparse_decode.reference(q, kc, vc, ids, ntok, 0.3))
