"""The per-layer decode step (adapter/executor.py) against the core, with both KV-ops implementations, no engine.

A synthetic layer (3 KV heads in 3 tiers: two dynamic, one static; GQA 2) holds requests whose prompts were
processed as the backend leaves them: dynamic heads' complete chunks in the cold tier and chunks ``0 .. kept - 1``
in their hot buffers, static heads' kept tokens in blocks ``[0, kept)``, freed blocks filled with garbage. Two
decode steps then run through :func:`run_layer`; every (row, head) must equal the core reference's attention over
the chunks ``core.selection`` selects (dynamic) or the kept tokens (static), plus the hot tail.

The same step runs under a dispatch guard (``torch.utils._python_dispatch.TorchDispatchMode``): any operation that
reads a tensor's value on the host (``aten._local_scalar_dense``: ``.item()``, ``.tolist()``, ``bool()``) or whose
output shape depends on data (``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``) fails the test,
and the operations issued for one row must be the same as for three (nothing per row).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hybridkv_kernels as hk
from hybridkv_vllm.adapter.cold_tier import ColdTier
from hybridkv_vllm.adapter.executor import run_layer
from hybridkv_vllm.adapter.kv_ops import CpuKVOps, LayerHeads, TritonKVOps, plan_layers
from hybridkv_vllm.core.reference import dense_attention, sparse_decode_attention
from hybridkv_vllm.core.selection import SelectionConfig, chunk_summaries, score_chunks, select_chunks
from hybridkv_vllm.core.step_plan import StepPlan, plan_rows, rewrite_group

BS, D, H, G, NB = 32, 32, 3, 2, 80
KEPT = [3, 2, 4]                         # blocks kept by tier t = head t
DYNAMIC, STATIC = [0, 2], [1]
SCALE = D ** -0.5
SEL = SelectionConfig(chunk_size=BS)
# the CPU implementation is vLLM's CPU kernels (marked: the GPU check machine has no vLLM)
KINDS = [pytest.param("cpu", marks=pytest.mark.vllm), "triton"]


class Layer:
    _k_scale_float = 1.0
    _v_scale_float = 1.0


def make_ops(kind: str, sel: SelectionConfig = SEL):
    if kind == "triton":
        pytest.importorskip("triton")
        return TritonKVOps(BS, D, torch.float32, sel)
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from hybridkv_vllm.adapter import cpu_layout
    isa = _get_attn_isa(torch.float32, BS, D, "auto")
    return CpuKVOps(BS, D, torch.float32, sel, isa=isa, kv_cache_dtype="auto",
                    key_perm=cpu_layout.key_layout(isa, torch.float32, BS, D))


def heads_of_layer() -> LayerHeads:
    return LayerHeads(index=0, tiers=torch.arange(H), base=torch.arange(H) * NB,
                      stride=torch.ones(H, dtype=torch.long), dynamic=torch.tensor(DYNAMIC), cold_start=0,
                      static=torch.tensor(STATIC), signature=tuple(range(H)))


def build(ops, num_rows: int, seed: int):
    """State after prefill plus the plan of one decode step of ``num_rows`` rows."""
    g = torch.Generator().manual_seed(seed)
    heads = heads_of_layer()
    pool = torch.randn(H * NB, 2 * BS, D, generator=g)           # garbage everywhere until written
    sub = ops.selection.sub_chunks
    cold = ColdTier(BS, D, torch.float32, len(DYNAMIC), units=sub)
    prompt_lens = [int(torch.randint(260, 420, (1,), generator=g)) for _ in range(num_rows)]
    seq_lens = [p + int(torch.randint(1, 40, (1,), generator=g)) for p in prompt_lens]
    width = max(-(-s // BS) for s in seq_lens)
    tables = torch.zeros(H, num_rows, width, dtype=torch.int32)
    for t in range(H):
        ids = torch.randperm(NB - 1, generator=g)[:num_rows * width] + 1
        tables[t] = ids.view(num_rows, width).int()
    k_all = [torch.randn(s, H, D, generator=g) for s in seq_lens]
    v_all = [torch.randn(s, H, D, generator=g) for s in seq_lens]
    kept_positions = {}
    for r, (p, s) in enumerate(zip(prompt_lens, seq_lens)):
        c = p // BS
        for h in range(H):
            pages = heads.base[h] + tables[h, r].long()             # stride 1
            kh, vh = k_all[r][:, h], v_all[r][:, h]
            tail = torch.arange(c * BS, (s - 1) // BS * BS + BS)                  # the current token: garbage
            tail_k, tail_v = kh[tail.clamp(max=s - 1)], vh[tail.clamp(max=s - 1)]
            ops.write_pages(pool, pages[c:c + len(tail) // BS], tail_k.view(-1, BS, D), tail_v.view(-1, BS, D))
            if h in STATIC:
                chosen = torch.sort(torch.randperm(c * BS, generator=g)[:KEPT[h] * BS]).values
                kept_positions[r, h] = chosen
                ops.write_pages(pool, pages[:KEPT[h]], kh[chosen].view(-1, BS, D), vh[chosen].view(-1, BS, D))
            else:
                ops.write_pages(pool, pages[:KEPT[h]], kh[:KEPT[h] * BS].view(-1, BS, D),
                                vh[:KEPT[h] * BS].view(-1, BS, D))
        slot = cold.admit(f"r{r}", c, torch.tensor([KEPT[h] for h in DYNAMIC]))
        for i, h in enumerate(DYNAMIC):
            pages = cold.table[slot, i, :c]
            kh, vh = k_all[r][:c * BS, h], v_all[r][:c * BS, h]
            ops.write_pages(cold.pages, pages, kh.view(c, BS, D), vh.view(c, BS, D))
            kmin, kmax = chunk_summaries(kh[None], BS // sub)                  # one per retrieval unit
            rows_ = (pages[:, None] * sub + torch.arange(sub)).reshape(-1)
            cold.kmin[rows_], cold.kmax[rows_] = kmin[0], kmax[0]
    qsl = list(range(num_rows + 1))
    rows = plan_rows([f"r{r}" for r in range(num_rows)], prompt_lens, qsl, seq_lens, BS, 2, 256)
    plan = StepPlan(rows, num_rows, torch.tensor(qsl, dtype=torch.int32), BS)
    for t in range(H):
        slots = torch.stack([tables[t, r, (s - 1) // BS].long() * BS + (s - 1) % BS for r, s in enumerate(seq_lens)])
        plan.add_group(t, rewrite_group(rows, tables[t], torch.tensor(seq_lens, dtype=torch.int32), slots,
                                        lambda p, budget, kept=KEPT[t]: kept, BS))
    plan.finalize(H, cold.slot_of)
    new_kv = (torch.stack([k[-1] for k in k_all]), torch.stack([v[-1] for v in v_all]))
    return plan, heads, pool, cold, k_all, v_all, kept_positions, new_kv


def expected(q, plan, k_all, v_all, kept_positions, sel: SelectionConfig = SEL):
    out = []
    units, sub = sel.retrieval_units(), sel.sub_chunks
    u = units.chunk_size
    for r, row in enumerate(plan.rows):
        c, s = row.prompt_len // BS, row.seq_len
        positions = []
        for h in range(H):
            if h in STATIC:
                prompt = kept_positions[r, h]
            else:
                kmin, kmax = chunk_summaries(k_all[r][:c * BS, h][None], u)
                scores = score_chunks(q[r, h * G:(h + 1) * G], kmin, kmax)
                chunks = select_chunks(scores, c * sub, KEPT[h] * sub, units)[0]
                prompt = (chunks[:, None] * u + torch.arange(u)).flatten()
            positions.append(torch.cat([prompt, torch.arange(c * BS, s)]))
        out.append(sparse_decode_attention(q[r], k_all[r], v_all[r], positions, SCALE))
    return torch.stack(out)


@pytest.mark.triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sub", [1, 2, 4])
def test_decode_step_equals_the_core_reference(kind, sub):
    """``sub``: retrieval units per block (finer units are copied piecewise into the hot blocks)."""
    sel = SelectionConfig(chunk_size=BS, sub_chunks=sub)
    ops = make_ops(kind, sel)
    plan, heads, pool, cold, k_all, v_all, kept_positions, new_kv = build(ops, 3, seed=1)
    loads = torch.zeros((), dtype=torch.long)
    g = torch.Generator().manual_seed(7)
    for step in range(2):                          # the second step starts from the first one's hot buffers
        q = torch.randn(3, H * G, D, generator=g)
        out = torch.zeros_like(q)
        run_layer(ops, plan, heads, plan_layers(plan, [heads], cold, sel)[0], pool, cold, q, new_kv, out, SCALE, Layer,
                  loads)
        torch.testing.assert_close(out, expected(q, plan, k_all, v_all, kept_positions, sel), atol=2e-5, rtol=1e-4)
    assert int(loads) > 0                          # chunks were swapped in from the cold tier


@pytest.mark.triton
@pytest.mark.vllm                           # both implementations: the Triton one's prefill is vLLM's own kernel
@pytest.mark.parametrize("kind", ["cpu", "triton"])
def test_prefill_and_decode_rows_of_one_step_attend_densely_like_the_core(kind, monkeypatch):
    """A step of rows the scheduler mixes: a whole prompt, a chunk continuing an earlier one, a decode row and a
    short prompt, over three tiers with their own tables. Every query token attends causally over its row's keys
    (``core.reference.dense_attention``); the Triton implementation's prefill rows go through vLLM's own kernel."""
    ops = make_ops(kind)
    launches = []
    if kind == "triton":
        from hybridkv_vllm.adapter import vllm_triton
        kernel = vllm_triton.unified_attention()
        monkeypatch.setattr(vllm_triton, "unified_attention",
                            lambda: lambda **kw: (launches.append(kw["q"].shape), kernel(**kw)))
    g = torch.Generator().manual_seed(11)
    heads = heads_of_layer()
    pool = torch.randn(H * NB, 2 * BS, D, generator=g)                   # garbage until written
    computed, seq_lens = [0, 64, 59, 0], [70, 104, 60, 33]               # rows: tokens cached before, after
    qsl = [0]
    for c, s in zip(computed, seq_lens):
        qsl.append(qsl[-1] + s - c)
    n = qsl[-1]
    width = max(-(-s // BS) for s in seq_lens)
    tables = torch.stack([(torch.randperm(NB - 1, generator=g)[:len(seq_lens) * width] + 1).view(len(seq_lens),
                                                                                              width).int()
                          for _ in range(H)])
    k_all = [torch.randn(s, H, D, generator=g) for s in seq_lens]
    v_all = [torch.randn(s, H, D, generator=g) for s in seq_lens]
    for r, c in enumerate(computed):                                     # earlier steps' tokens, whole blocks
        for h in range(H):
            blocks = -(-c // BS)
            if blocks:
                pos = torch.arange(blocks * BS).clamp(max=c - 1)
                ops.write_pages(pool, heads.base[h] + tables[h, r, :blocks].long(),
                                k_all[r][pos, h].view(-1, BS, D), v_all[r][pos, h].view(-1, BS, D))
    rows = plan_rows([f"r{r}" for r in range(len(seq_lens))], [70, 104, 50, 33], qsl, seq_lens, BS, 2, 4096)
    plan = StepPlan(rows, n, torch.tensor(qsl, dtype=torch.int32), BS)
    positions = torch.cat([torch.arange(c, s) for c, s in zip(computed, seq_lens)])
    row_of = torch.cat([torch.full((s - c,), r) for r, (c, s) in enumerate(zip(computed, seq_lens))])
    for t in range(H):
        slots = tables[t][row_of, positions // BS].long() * BS + positions % BS
        plan.add_group(t, rewrite_group(rows, tables[t], torch.tensor(seq_lens, dtype=torch.int32), slots,
                                        lambda p, budget: None, BS))
    plan.finalize(H, lambda req_id: None)
    assert plan.prefill_rows == [0, 1, 3] and plan.decode is None
    new_kv = tuple(torch.stack([x[r][p] for r, p in zip(row_of.tolist(), positions.tolist())]) for x in (k_all, v_all))
    q = torch.randn(n, H * G, D, generator=g)
    out = torch.zeros_like(q)
    run_layer(ops, plan, heads, plan_layers(plan, [heads], None, SEL)[0], pool, None, q, new_kv, out, SCALE, Layer,
              torch.zeros((), dtype=torch.long))
    for r, (c, s) in enumerate(zip(computed, seq_lens)):
        for i, p in enumerate(range(c, s)):
            t = qsl[r] + i
            ref = dense_attention(q[t:t + 1], k_all[r][:p + 1], v_all[r][:p + 1], SCALE)
            torch.testing.assert_close(out[t:t + 1], ref, atol=2e-5, rtol=1e-4, msg=f"row {r} position {p}")
    if kind == "triton":      # one launch of vLLM's kernel: every (head, prefill row) pair one of its sequences
        assert launches == [(H * (70 + 40 + 33), G, D)]


class Guard(TorchDispatchMode):
    """Records every aten operation; host reads and data-dependent output shapes are errors."""

    # ops that only view, or copy for a layout torch chose from the shapes (a [1, ...] transpose is a view, a
    # [3, ...] one is not): left out of the comparison, which is about computation repeated per row
    LAYOUT = {"aten.view", "aten._unsafe_view", "aten.clone", "aten._to_copy", "aten.expand", "aten.alias",
              "aten.transpose", "aten.t", "aten.permute", "aten.squeeze", "aten.unsqueeze", "aten.slice",
              "aten.select", "aten.as_strided", "aten.reshape", "aten.contiguous", "aten.detach", "aten.lift_fresh"}
    FORBIDDEN = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique",
                 "aten._unique", "aten.item")

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith(self.FORBIDDEN):
            raise AssertionError(f"the per-layer step ran {func}: a host read or a data-dependent shape")
        if name in ("aten.index", "aten.index_put", "aten.index_put_"):
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                raise AssertionError(f"the per-layer step indexed with a boolean mask ({func})")
        if name not in self.LAYOUT:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def guarded_ops(kind: str, num_rows: int) -> list[str]:
    ops = make_ops(kind)
    plan, heads, pool, cold, _, _, _, new_kv = build(ops, num_rows, seed=num_rows)
    q = torch.randn(num_rows, H * G, D)
    step = plan_layers(plan, [heads], cold, SEL)[0]                  # once per step, for every layer: not guarded
    with Guard() as guard:
        run_layer(ops, plan, heads, step, pool, cold, q, new_kv, torch.zeros_like(q), SCALE, Layer,
                  torch.zeros((), dtype=torch.long))
    return guard.ops


@pytest.fixture
def record_triton_launches(monkeypatch):
    """Kernel launches are replaced so that the guard sees the Python around them (the interpreter itself reads
    tensors on the host, as a GPU launch never does): attention and swap-in do nothing, chunk selection writes its
    reference's result (later indexing reads it)."""
    for module in (hk.swap_in, hk.sparse_decode):
        monkeypatch.setattr(module, "launch", lambda *args, **kwargs: None)

    def select(q, kmin, kmax, block_table, seq_lens, k, out, **kwargs):
        kwargs = {key: kwargs[key] for key in ("chunk_size", "sink_chunks", "recent_chunks", "k_per")}
        out.copy_(hk.chunk_scoring.reference(q, kmin, kmax, block_table, seq_lens, k, **kwargs)[0])
    monkeypatch.setattr(hk.chunk_scoring, "launch", select)


@pytest.mark.vllm
@pytest.mark.triton
def test_cpu_layer_step_never_reads_the_host_and_issues_the_same_ops_for_one_row_and_three(monkeypatch):
    from vllm import _custom_ops
    calls = []
    for name in ("cpu_attention_with_kv_cache", "cpu_attn_reshape_and_cache"):
        original = getattr(_custom_ops, name)
        monkeypatch.setattr(_custom_ops, name, lambda *a, _n=name, _f=original, **k: (calls.append(_n), _f(*a, **k)))
    one, three = guarded_ops("cpu", 1), guarded_ops("cpu", 3)
    assert one == three
    # every KV head of the layer, every row: one vLLM kernel call each for writing and for attending
    assert sorted(calls) == sorted(["cpu_attention_with_kv_cache", "cpu_attn_reshape_and_cache"] * 2)


@pytest.mark.triton
def test_triton_layer_step_never_reads_the_host_and_issues_the_same_ops_for_one_row_and_three(
        record_triton_launches):
    pytest.importorskip("triton")
    assert guarded_ops("triton", 1) == guarded_ops("triton", 3)


@pytest.mark.triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sub", [1, 4])
def test_summaries_equal_the_core(kind, sub):
    ops = make_ops(kind, SelectionConfig(chunk_size=BS, sub_chunks=sub))
    cold = ColdTier(BS, D, torch.float32, 1, units=sub)
    slot = cold.admit("r", 5, torch.tensor([2]))
    pages = cold.table[slot, 0, :5]
    k = torch.randn(5 * BS, D)
    ops.write_pages(cold.pages, pages, k.view(5, BS, D), torch.randn(5, BS, D))
    ops.summaries(cold, pages, cold.pages[pages])
    kmin, kmax = chunk_summaries(k[None], BS // sub)                       # one per unit, units in page order
    rows = (pages[:, None] * sub + torch.arange(sub)).reshape(-1)
    torch.testing.assert_close(cold.kmin[rows], kmin[0])
    torch.testing.assert_close(cold.kmax[rows], kmax[0])


@pytest.mark.triton
@pytest.mark.parametrize("kind", KINDS)
def test_compaction_moves_the_kept_tokens_to_the_first_blocks(kind):
    ops = make_ops(kind)
    pool = torch.randn(2 * NB, 2 * BS, D)
    pages = torch.stack([torch.randperm(NB - 1)[:6] + 1, torch.randperm(NB - 1)[:6] + 1 + NB])   # [2, 6]
    k, v = (torch.randn(2, 6 * BS, D) for _ in range(2))
    for h in range(2):
        ops.write_pages(pool, pages[h], k[h].view(6, BS, D), v[h].view(6, BS, D))
    kept = torch.stack([torch.sort(torch.randperm(6 * BS)[:2 * BS]).values,
                        torch.sort(torch.randperm(6 * BS)[:2 * BS]).values])
    num_kept = torch.tensor([2 * BS, BS])
    ops.compact(pool, pages, kept, num_kept)
    for h in range(2):
        n = int(num_kept[h])
        got_k, got_v = ops.read_pages(pool, pages[h, :n // BS])
        torch.testing.assert_close(got_k.reshape(-1, D), k[h, kept[h, :n]])
        torch.testing.assert_close(got_v.reshape(-1, D), v[h, kept[h, :n]])


@pytest.mark.vllm
@pytest.mark.parametrize("sub", [1, 4])
@pytest.mark.parametrize("seed", range(3))
def test_cpu_selection_equals_the_kernel_reference(seed, sub):
    """CpuKVOps.select (fewer operations) selects what ``chunk_scoring``'s reference selects over the same
    retrieval units (whole chunks, or ``sub`` units per chunk addressed ``page x sub + j``)."""
    g = torch.Generator().manual_seed(seed)
    sel = SelectionConfig(chunk_size=BS, sub_chunks=sub)
    units = sel.retrieval_units()
    ops = make_ops("cpu", sel)
    rows, heads, width, nc = 4, 3, 12, 200
    kmin = torch.randn(nc * sub, D, generator=g)
    kmax = kmin + torch.rand(nc * sub, D, generator=g)
    table = torch.randint(0, nc, (rows, heads, width), generator=g)
    chunks = torch.randint(3, width + 1, (rows,), generator=g)
    k = torch.randint(0, 3, (rows, heads), generator=g).clamp(max=chunks[:, None] - 1)
    k[0, 0] = 0
    table[0, 0] = -1                                         # a head without a cold entry retrieves nothing
    q = torch.randn(rows, heads * G, D, generator=g)
    unit_table = table if sub == 1 else torch.where(table[..., None] < 0, -1, table[..., None] * sub +
                                                    torch.arange(sub)).flatten(2)
    want = hk.chunk_scoring.reference(q, kmin[:, None].expand(nc * sub, heads, D),
                                      kmax[:, None].expand(nc * sub, heads, D), unit_table, chunks * BS, 4 * sub,
                                      chunk_size=units.chunk_size, sink_chunks=units.sink_chunks,
                                      recent_chunks=units.recent_chunks, k_per=k * sub)[0]
    cold = SimpleNamespace(bounds=torch.stack([kmin, kmax], dim=1), table=table)
    plan = SimpleNamespace(decode=SimpleNamespace(cold_slots=torch.arange(rows), chunk_tokens=chunks * BS, k_max=4,
                                                  k=k.transpose(0, 1), k_host=k.transpose(0, 1),
                                                  rows=torch.arange(rows)),
                           tables=torch.zeros(heads, rows, 4, dtype=torch.long),
                           prompt_tables=torch.zeros(heads, rows, 4, dtype=torch.long),
                           slots=torch.zeros(heads, rows, dtype=torch.long), seq_lens=torch.zeros(heads, rows),
                           block_size=BS)
    layer = LayerHeads(index=0, tiers=torch.arange(heads), base=torch.zeros(heads, dtype=torch.long),
                       stride=torch.ones(heads, dtype=torch.long), dynamic=torch.arange(heads), cold_start=0,
                       static=torch.tensor([], dtype=torch.long), signature=tuple(range(heads)))
    step = plan_layers(plan, [layer], cold, sel)[0]
    got = ops.select(q, cold, step, plan.decode)                 # priority order: the first k count
    assert got.shape[2] == 4 * sub
    for r in range(rows):
        for h in range(heads):
            n = int(k[r, h]) * sub
            assert sorted(got[r, h, :n].tolist()) == want[r, h, :n].tolist()
            assert (want[r, h, n:] == -1).all()


@pytest.mark.vllm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sub", [2, 4])
def test_cpu_unit_fill_copies_whole_units_in_any_key_layout(dtype, sub):
    """``CpuKVOps._fill_units`` (runs of contiguous elements found from the ISA's key layout: 8 for ``vec``, 16
    for ``amx``) against ``read_pages``: every live unit's tokens arrive whole in their hot slot, a head without
    live slots and every other place keep what they held."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from hybridkv_vllm.adapter import cpu_layout
    from hybridkv_vllm.adapter.kv_ops import LayerStep

    isa = _get_attn_isa(dtype, BS, D, "auto")
    ops = CpuKVOps(BS, D, dtype, SelectionConfig(chunk_size=BS, sub_chunks=sub), isa=isa, kv_cache_dtype="auto",
                   key_perm=cpu_layout.key_layout(isa, dtype, BS, D))
    g = torch.Generator().manual_seed(sub)
    pool, cold_pages = torch.zeros(12, 2 * BS, D, dtype=dtype), torch.zeros(9, 2 * BS, D, dtype=dtype)
    for target in (pool, cold_pages):
        n = target.shape[0]
        ops.write_pages(target, torch.arange(n), torch.randn(n, BS, D, generator=g).to(dtype),
                        torch.randn(n, BS, D, generator=g).to(dtype))
    before = ops.read_pages(pool, torch.arange(12))
    k = 3                                                               # unit slots per (row, head)
    hot = torch.tensor([[[4 * sub + 1, 7 * sub, 2 * sub + sub - 1], [9 * sub, 9 * sub + 1, 3 * sub]]])   # [1, 2, k]
    src = torch.tensor([[[5 * sub, 0, 8 * sub + sub - 1], [sub + 1, 2, 6 * sub]]])
    live = torch.tensor([[[True, True, False], [False, False, False]]])    # head 1: no live slot
    step = LayerStep(None, None, None, None, hot=hot, live=live,
                     hot_or_first=torch.where(live, hot, hot[..., :1]), every_head_retrieves=False, units=sub, k_max=k)
    ops._fill_units(pool, SimpleNamespace(pages=cold_pages), step, src)
    (k_new, v_new), (k_old, v_old) = ops.read_pages(pool, torch.arange(12)), before
    (k_cold, v_cold) = ops.read_pages(cold_pages, torch.arange(9))
    u = BS // sub
    want_k, want_v = k_old.clone(), v_old.clone()
    for dst_unit, src_unit in zip(hot[live].tolist(), src[live].tolist()):
        dp, dj, sp, sj = dst_unit // sub, dst_unit % sub, src_unit // sub, src_unit % sub
        want_k[dp, dj * u:(dj + 1) * u] = k_cold[sp, sj * u:(sj + 1) * u]
        want_v[dp, dj * u:(dj + 1) * u] = v_cold[sp, sj * u:(sj + 1) * u]
    assert torch.equal(k_new, want_k) and torch.equal(v_new, want_v)
