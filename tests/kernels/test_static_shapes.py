"""Decode-path contract: no output shape depends on data (reference path; the Triton path writes the caller's
preallocated buffers by construction). Each kernel runs on two different inputs of the same shapes."""
import pytest
import torch

from hybridkv_kernels import chunk_scoring, compaction, sparse_decode, text_prior
from kernel_testutil import gen, paged_cache, randn

pytestmark = pytest.mark.triton

BS, D = 4, 16


def _decode_step(seed, seqs):
    """One decode step on the reference path: summaries, chunk selection, sparse attention. Returns every output."""
    g = gen(seed)
    _, kc, vc, table, _, _ = paged_cache(g, seqs, 2, D, BS, torch.float32, extra_blocks=2)
    seq = torch.tensor(seqs, dtype=torch.int32)
    kmin, kmax = torch.zeros(kc.shape[0], 2, D), torch.zeros(kc.shape[0], 2, D)
    compaction.summaries_from_table(kc, table, seq, kmin, kmax, backend="torch")
    q = randn(g, len(seqs), 4, D)
    k = 3
    idx = torch.empty(len(seqs), 2, k, dtype=torch.int32)
    ids, ntok = torch.empty_like(idx), torch.empty(len(seqs), 2, dtype=torch.int32)
    chunk_scoring.run(q, kmin, kmax, table, seq, k, idx, chunk_size=BS, out_block_ids=ids, out_num_tokens=ntok,
                      backend="torch")
    out = torch.empty_like(q)
    sparse_decode.run(q, kc, vc, ids, ntok, 0.3, out, backend="torch")
    ref = chunk_scoring.reference(q, kmin, kmax, table, seq, k, chunk_size=BS)
    return (idx, ids, ntok, out, *ref, sparse_decode.reference(q, kc, vc, ids, ntok, 0.3), kmin, kmax)


def test_decode_outputs_have_data_independent_shapes():
    # same shapes (4 blocks per table row), different data *and* different lengths: 1 chunk vs 4 chunks
    a = _decode_step(1, [1, 16, 5])
    b = _decode_step(2, [16, 2, 13])
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype
    assert (a[0][0] == -1).any() and not (b[0][0] == -1).any()  # fixed-k padding, not a shorter tensor


def test_text_prior_and_compaction_shapes():
    shapes = set()
    for seed in (3, 4):
        g = gen(seed)
        out = text_prior.reference(randn(g, 3, 2, D), randn(g, 10, 1, D), torch.tensor([7, 8, 9]), 0.3, span=(2, 6))
        shapes.add(tuple(out.shape))
    assert shapes == {(1, 4)}
    ws = compaction.alloc_compact_workspace(torch.empty(5, BS, 2, D), 3, 7)
    assert [tuple(t.shape) for t in ws] == [(3, 2, 7, D)] * 2


def test_sparse_decode_workspace_shape_is_planned_from_shapes_only():
    s1 = sparse_decode.plan_splits(4, 4, 4096, "cpu")
    s2 = sparse_decode.plan_splits(4, 4, 4096, "cpu")
    assert s1 == s2 >= 1
    ws = sparse_decode.Workspace.alloc(4, 28, 128, s1, "cpu")
    assert ws.num_splits == s1 and ws.o.shape == (4, 28, s1, 128)
