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


@pytest.mark.parametrize("Hq,H", [(4, 2), (7, 1)])
def test_fused_combine_reuses_workspace(Hq, H, device):
    """The in-kernel combine (``Workspace.alloc`` gives arrival counters): repeated calls on one workspace, new
    inputs each time, stay exact, and every counter is back at 0 after each call (so graph replays work)."""
    g = gen(seed_of("fused", Hq, H))
    seqs = [1, 13, 26, 40]
    _, kc, vc, table, _, _ = paged_cache(g, seqs, H, D, BS, torch.float32, device=device)
    ws = sparse_decode.Workspace.alloc(len(seqs), Hq, D, 3, device)
    assert ws.counter is not None and (ws.counter == 0).all()
    for _ in range(3):
        ids, ntok = _lists(g, table, seqs, H, L=10, device=device)
        q = randn(g, len(seqs), Hq, D, device=device)
        _check(q, kc, vc, ids, ntok, torch.float32, workspace=ws)
        assert (ws.counter == 0).all()


@pytest.mark.parametrize("splits,max_fused,chunk", [(2, None, None), (3, None, None), (8, None, None),
                                                    (37, None, None), (37, 64, 2), (7, 64, 4)])
def test_fused_matches_two_kernel_path(splits, max_fused, chunk, device, monkeypatch):
    """Counters present (fused combine; several merge steps when ``COMBINE_CHUNK_S < S``; the separate kernel
    beyond ``FUSED_MAX_SPLITS``) vs absent (``_combine_kernel``): both equal the reference; bf16 in, bf16 out."""
    if max_fused is not None:
        monkeypatch.setattr(sparse_decode, "FUSED_MAX_SPLITS", max_fused)
    monkeypatch.setattr(sparse_decode, "COMBINE_CHUNK_S", chunk)
    g = gen(seed_of("two", splits, chunk))
    seqs = [5, 60, 64]
    _, kc, vc, table, _, _ = paged_cache(g, seqs, 2, D, BS, torch.bfloat16, device=device)
    ids, ntok = _lists(g, table, seqs, 2, L=16, device=device)
    q = randn(g, 3, 8, D, dtype=torch.bfloat16, device=device)
    ws = sparse_decode.Workspace.alloc(3, 8, D, splits, device)
    _check(q, kc, vc, ids, ntok, torch.bfloat16, workspace=ws)
    assert (ws.counter == 0).all()
    _check(q, kc, vc, ids, ntok, torch.bfloat16, workspace=sparse_decode.Workspace(ws.o, ws.lse))


def test_bad_counter_rejected(device):
    g = gen(8)
    _, kc, vc, table, _, _ = paged_cache(g, [8], 2, D, BS, torch.float32, device=device)
    ids, ntok = _lists(g, table, [8], 2, L=2, device=device)
    q = randn(g, 1, 4, D, device=device)
    ws = sparse_decode.Workspace.alloc(1, 4, D, 2, device)
    bad = sparse_decode.Workspace(ws.o, ws.lse, torch.zeros(1, 4, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="counter"):
        sparse_decode.launch(q, kc, vc, ids, ntok, 0.3, torch.empty_like(q), workspace=bad)


def test_plan_splits_fit():
    """``fit=True`` minimises the documented whole-wave cost; ``fit=None`` fits only when B * H < sms / 2."""
    sms = 4  # plan_splits' stand-in SM count off CUDA
    for B, H, T in [(1, 1, 4096), (1, 3, 4096), (2, 2, 300), (5, 4, 8192)]:
        cap = min(-(-T // 128), 256)
        cost = lambda s: (-(-B * H * s // (2 * sms)) * (T / s + 128), s)  # noqa: E731
        assert sparse_decode.plan_splits(B, H, T, "cpu", fit=True) == min(range(1, cap + 1), key=cost)
        waves = max(1, min(-(-2 * sms // (B * H)), cap))
        assert sparse_decode.plan_splits(B, H, T, "cpu", fit=False) == waves
        assert sparse_decode.plan_splits(B, H, T, "cpu") == (min(range(1, cap + 1), key=cost) if 2 * B * H < sms
                                                             else waves)
