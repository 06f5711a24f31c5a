"""Decode-path contract: nothing about a launch depends on tensor *values*, only on shapes (CUDA-graph safety).

Every scenario below runs one kernel dispatch twice on inputs of the same shapes but different contents (other
sequence lengths, kept counts, query positions, ...) and checks:

- the Triton path (``backend="triton"``) makes the same launches both times: same kernels, grids, scalar and
  constexpr arguments, and tensor arguments of the same shapes, dtypes and strides; and its host-side code runs no
  op that reads a device value or has a data-dependent output shape (``.item()``, ``nonzero``, boolean-mask
  indexing, ...), each of which would be a host sync on CUDA and break graph capture. The kernels are recorded,
  not run, so this checks the launchers themselves, whatever the device;
- the Triton path, really run (interpreter on the CPU), writes into the caller's buffers and agrees with the
  reference path, whose outputs have the same shapes and dtypes for both contents.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hybridkv_kernels import chunk_scoring, compaction, sparse_decode, text_prior
from kernel_testutil import gen, paged_cache, randn

pytestmark = pytest.mark.triton

BS, D = 4, 16
KERNEL_MODULES = (chunk_scoring, compaction, sparse_decode, text_prior)

# ops whose result must be read on the host (a device sync on CUDA) or whose output shape depends on values
SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
            "aten::nonzero_static", "aten::argwhere", "aten::masked_select", "aten::unique", "aten::_unique",
            "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::repeat_interleave",
            "aten::bincount", "aten::allclose"}
BOOL_INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


# ------------------------------------------------------------------------------------------------------ scenarios
# Each scenario(seed, backend, device) builds inputs whose contents depend on the seed (shapes never do), makes
# one dispatch per kernel module involved and returns the output buffers it passed in. Building the inputs may
# read values on the host (it is test code); only the dispatch calls (DISPATCH) are watched for syncs.
def decode_step(seed, backend, device):
    """Summaries of every block, chunk selection, sparse attention: one decode step of a batch of 3."""
    seqs = [1, 16, 5] if seed % 2 else [16, 2, 13]     # 4 blocks per table row either way: 1 chunk vs 4 chunks
    g = gen(seed)
    _, kc, vc, table, _, _ = paged_cache(g, seqs, 2, D, BS, torch.float32, extra_blocks=2, device=device)
    seq = torch.tensor(seqs, dtype=torch.int32, device=device)
    kmin = torch.zeros(kc.shape[0], 2, D, device=device)
    kmax = torch.zeros_like(kmin)
    compaction.summaries_from_table(kc, table, seq, kmin, kmax, backend=backend)
    q = randn(g, len(seqs), 4, D, device=device)
    idx = torch.empty(len(seqs), 2, 3, dtype=torch.int32, device=device)
    ids, ntok = torch.empty_like(idx), torch.empty(len(seqs), 2, dtype=torch.int32, device=device)
    chunk_scoring.run(q, kmin, kmax, table, seq, 3, idx, chunk_size=BS, out_block_ids=ids, out_num_tokens=ntok,
                      backend=backend)
    out = torch.empty_like(q)
    ws = sparse_decode.Workspace.alloc(len(seqs), 4, D, 2, device)       # caller-owned, S = 2 (fused combine)
    sparse_decode.run(q, kc, vc, ids, ntok, 0.3, out, workspace=ws, backend=backend)
    return {"kmin": kmin, "kmax": kmax, "idx": idx, "ids": ids, "ntok": ntok, "out": out, "counter": ws.counter}


def decode_planned_splits(seed, backend, device):
    """Sparse decode without a workspace: the splits are planned (and the partials allocated) from shapes only."""
    g = gen(seed)
    seqs = [3, 30] if seed % 2 else [29, 1]
    _, kc, vc, table, _, _ = paged_cache(g, seqs, 2, D, BS, torch.float32, device=device)
    ids = table[:, None, :].expand(2, 2, table.shape[1]).contiguous()
    ntok = torch.tensor(seqs, dtype=torch.int32, device=device)[:, None].expand(2, 2).contiguous()
    q = randn(g, 2, 4, D, device=device)
    out = torch.empty_like(q)
    sparse_decode.run(q, kc, vc, ids, ntok, 0.3, out, backend=backend)
    return {"out": out}


def compact_kept(seed, backend, device):
    """In-place compaction of each (request, head)'s kept tokens (different kept lists and counts)."""
    g = gen(seed)
    seqs = [9, 14]
    cache, kc, vc, table, _, _ = paged_cache(g, seqs, 2, D, BS, torch.float32, device=device)
    kept = torch.full((2, 2, 6), -1, dtype=torch.int32)
    nk = torch.zeros(2, 2, dtype=torch.int32)
    for b, s in enumerate(seqs):
        for h in range(2):
            n = int(torch.randint(0, 7, (), generator=g))
            kept[b, h, :n] = torch.randperm(s, generator=g)[:n].sort().values.to(torch.int32)
            nk[b, h] = n
    ws = compaction.alloc_compact_workspace(kc, 2, 6)
    compaction.compact(kc, vc, table, kept.to(device), nk.to(device), ws, backend=backend)
    return {"cache": cache}


def text_prior_scores(seed, backend, device):
    """Text-prior column sums over a visual span (different query positions and contents)."""
    g = gen(seed)
    q_obs, k = randn(g, 5, 4, D, device=device), randn(g, 40, 2, D, device=device)
    q_pos = (torch.arange(35, 40) - 7 * (seed % 2)).to(device=device, dtype=torch.int32)
    out = torch.empty(2, 20, device=device)
    ws = text_prior.alloc_workspace(4, 5, 40, device)
    text_prior.run(q_obs, k, q_pos, 0.3, out, span=(8, 28), workspace=ws, backend=backend)
    return {"out": out}


SCENARIOS = [decode_step, decode_planned_splits, compact_kept, text_prior_scores]
DISPATCH = [(chunk_scoring, "run"), (compaction, "compact"), (compaction, "summaries_from_table"),
            (sparse_decode, "run"), (text_prior, "run")]


# ------------------------------------------------------------------------------------------------------ recorders
def _sig(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.stride())
    return value


class _RecordedKernel:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](*args, **meta)`` records the launch, runs nothing."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def __getitem__(self, grid):
        assert not callable(grid), f"{self.name}: a grid computed from meta-parameters is not recorded here"

        def launch(*args, **kwargs):
            self.log.append((self.name, tuple(int(x) for x in grid), tuple(_sig(a) for a in args),
                             tuple(sorted((k, _sig(v)) for k, v in kwargs.items()))))
        return launch


class _SyncOps(TorchDispatchMode):
    """Records every aten op that needs a device value on the host or has a value-dependent output shape."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNC_OPS:
            self.found.append(name)
        elif name in BOOL_INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                            for i in (args[1] if len(args) > 1 else ())):
            self.found.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


def _record(scenario, seed, monkeypatch):
    """Run ``scenario`` on the Triton path with every kernel recorded; returns (launches, sync ops in dispatch)."""
    log: list = []
    sync = _SyncOps()

    def watched(fn):
        def call(*args, **kwargs):
            with sync:
                return fn(*args, **kwargs)
        return call

    with monkeypatch.context() as m:
        for module in KERNEL_MODULES:
            for name in dir(module):
                if name.startswith("_") and name.endswith("_kernel"):
                    m.setattr(module, name, _RecordedKernel(f"{module.__name__}.{name}", log))
        for module, name in DISPATCH:
            m.setattr(module, name, watched(getattr(module, name)))
        scenario(seed, "triton", "cpu")
    return log, sync.found


# ---------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_triton_launches_depend_on_shapes_only(scenario, monkeypatch):
    launches_a, sync_a = _record(scenario, 1, monkeypatch)
    launches_b, sync_b = _record(scenario, 2, monkeypatch)
    assert launches_a, "no kernel was launched: the Triton path was not taken"
    assert not sync_a and not sync_b, f"host syncs / value-dependent shapes in the launchers: {sync_a + sync_b}"
    for a, b in zip(launches_a, launches_b):
        assert a == b, f"the launch of {a[0]} depends on the data:\n{a}\n{b}"
    assert len(launches_a) == len(launches_b)


def test_recorder_catches_a_value_dependent_launch(monkeypatch):
    """The check above can fail: a launcher that sizes its grid from a value is caught twice over."""
    def value_dependent_run(q, *args, **kwargs):
        n = int(q.abs().sum() > 10)                     # a host read: _local_scalar_dense
        sparse_decode._sparse_decode_kernel[(1 + n, 1, 1)](q)

    def scenario(seed, backend, device):
        sparse_decode.run(torch.full((1, 1, 1), float(5 * seed)))

    monkeypatch.setattr(sparse_decode, "run", value_dependent_run)
    launches_a, sync = _record(scenario, 1, monkeypatch)
    launches_b, _ = _record(scenario, 3, monkeypatch)
    assert sync == ["aten::_local_scalar_dense"] and launches_a != launches_b


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_outputs_are_the_callers_buffers_with_data_independent_shapes(scenario, device):
    ref_a, ref_b = scenario(1, "torch", device), scenario(2, "torch", device)
    for name in ref_a:
        assert ref_a[name].shape == ref_b[name].shape and ref_a[name].dtype == ref_b[name].dtype, name
    for seed, ref in ((1, ref_a), (2, ref_b)):
        got = scenario(seed, "triton", device)
        for name, t in got.items():
            assert t.shape == ref[name].shape and t.dtype == ref[name].dtype, name
            torch.testing.assert_close(t.cpu(), ref[name].cpu(), atol=2e-5, rtol=1e-5, msg=name)
    assert any(not torch.equal(ref_a[n].cpu(), ref_b[n].cpu()) for n in ref_a)   # the contents did differ


def test_decode_reference_pads_to_fixed_k():
    """Fixed-k padding, not a shorter tensor: a 1-chunk request still gets k entries, padded with -1."""
    a, b = decode_step(1, "torch", "cpu"), decode_step(2, "torch", "cpu")
    assert a["idx"].shape == b["idx"].shape == (3, 2, 3)
    assert (a["idx"][0] == -1).any() and not (b["idx"][0] == -1).any()
    assert int(a["counter"].abs().sum()) == 0


def test_sparse_decode_split_plan_uses_shapes_only(monkeypatch):
    """The planned split count follows the table width, not num_tokens; the workspace's S overrides it."""
    log, _ = _record(decode_planned_splits, 1, monkeypatch)
    (name, grid, _, _), = [entry for entry in log if entry[0].endswith("_sparse_decode_kernel")]
    assert grid[:2] == (2, 2) and grid[2] == sparse_decode.plan_splits(2, 2, 8 * BS, "cpu")
    log, _ = _record(decode_step, 1, monkeypatch)
    (name, grid, _, _), = [entry for entry in log if entry[0].endswith("_sparse_decode_kernel")]
    assert grid == (3, 2, 2)
