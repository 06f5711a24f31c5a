"""The step plan (core/step_plan.py) from fake metadata, no engine: rewritten tables, kept counts and the rows that
retrieve or complete their prompt, each against a plain per-row statement of the rule and ``core.tiers``."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv_vllm.core.step_plan import StepPlan, plan_rows, rewrite_group
from hybridkv_vllm.core.tiers import is_compressed, kept_blocks

BS, FLOOR, MIN_PROMPT = 16, 2, 64
FRACTIONS = (0.1, 0.25, 0.6, 1.0)


@st.composite
def steps(draw):
    """Rows in every phase: first prefill chunk, middle chunk, completing chunk, decode, short prompts, unknown."""
    rows = []
    for _ in range(draw(st.integers(1, 6))):
        prompt = draw(st.one_of(st.none(), st.integers(1, 400)))
        if prompt is None:
            computed, q = draw(st.integers(0, 50)), draw(st.integers(1, 20))
        else:
            phase = draw(st.sampled_from(["prefill", "complete", "decode"]))
            if phase == "prefill":
                computed = draw(st.integers(0, prompt - 1))
                q = draw(st.integers(1, prompt - computed))
            elif phase == "complete":
                computed = draw(st.integers(0, prompt - 1))
                q = prompt - computed
            else:
                computed = prompt + draw(st.integers(0, 60))
                q = 1
        rows.append((prompt, computed, q))
    return rows


def build(rows, with_slot=lambda req: 0):
    qsl, seq_lens = [0], []
    for _, computed, q in rows:
        qsl.append(qsl[-1] + q)
        seq_lens.append(computed + q)
    width = max(-(-s // BS) for s in seq_lens) + 1
    g = torch.Generator().manual_seed(len(rows))
    tables = [torch.randperm(1000, generator=g)[:len(rows) * width].view(len(rows), width).int()
              for _ in FRACTIONS]
    req_ids = [f"r{i}" for i in range(len(rows))]
    plan_rows_ = plan_rows(req_ids, [p for p, _, _ in rows], qsl, seq_lens, BS, FLOOR, MIN_PROMPT)
    plan = StepPlan(plan_rows_, qsl[-1], torch.tensor(qsl, dtype=torch.int32), BS)
    for t, fraction in enumerate(FRACTIONS):
        slots = torch.arange(qsl[-1], dtype=torch.long)
        rule = lambda p, budget, f=fraction: kept_blocks(p, f, BS, FLOOR, MIN_PROMPT)      # noqa: E731
        plan.add_group(t, rewrite_group(plan_rows_, tables[t], torch.tensor(seq_lens, dtype=torch.int32), slots,
                                        rule, BS))
    plan.finalize(len(FRACTIONS), with_slot)
    return plan, tables, seq_lens


@settings(max_examples=200, deadline=None)
@given(steps())
def test_rewritten_tables_and_kept_counts_follow_the_budget_rule(rows):
    plan, tables, seq_lens = build(rows)
    for r, (prompt, computed, q) in enumerate(rows):
        row = plan.rows[r]
        assert (row.prompt_len, row.computed, row.q_end - row.q_start, row.seq_len) == (prompt, computed, q,
                                                                                         computed + q)
        compressed = prompt is not None and is_compressed(prompt, BS, FLOOR, MIN_PROMPT)
        assert row.compressed == compressed
        for t, fraction in enumerate(FRACTIONS):
            kept = kept_blocks(prompt, fraction, BS, FLOOR, MIN_PROMPT) if compressed else None
            assert int(plan.kept[t, r]) == (kept or 0)
            table, seq = tables[t][r].long(), seq_lens[r]
            if kept is not None and computed >= prompt:                  # past its prompt: never a freed block
                first_tail = prompt // BS
                tail = table[first_tail:-(-seq // BS)]
                want = torch.cat([table[:kept], tail])
                assert torch.equal(plan.tables[t, r, :want.numel()], want)
                assert int(plan.seq_lens[t, r]) == kept * BS + seq - first_tail * BS
                freed = set(table[kept:first_tail].tolist())
                assert not freed & set(plan.tables[t, r, :-(-int(plan.seq_lens[t, r]) // BS)].tolist())
            else:
                assert torch.equal(plan.tables[t, r, :table.numel()], table)
                assert int(plan.seq_lens[t, r]) == seq
            assert torch.equal(plan.prompt_tables[t, r, :table.numel()], table)


@settings(max_examples=200, deadline=None)
@given(steps())
def test_retrieving_and_completing_rows(rows):
    plan, _, _ = build(rows, with_slot=lambda req: None if req == "r0" else int(req[1:]) + 100)
    want_decode = [r for r, (p, computed, q) in enumerate(rows)
                   if p is not None and is_compressed(p, BS, FLOOR, MIN_PROMPT) and computed >= p and q == 1
                   and r != 0]                                    # r0 holds no cold entry
    want_complete = [r for r, (p, computed, q) in enumerate(rows)
                     if p is not None and is_compressed(p, BS, FLOOR, MIN_PROMPT) and computed < p <= computed + q]
    assert plan.completing == want_complete
    assert plan.prefill_rows == [r for r, (_, _, q) in enumerate(rows) if q > 1]
    assert plan.single_rows.tolist() == [r for r, (_, _, q) in enumerate(rows) if q == 1]
    assert plan.single_tokens.tolist() == plan.query_start_loc[plan.single_rows].tolist()
    if not want_decode:
        assert plan.decode is None
        return
    dec = plan.decode
    assert dec.rows.tolist() == want_decode
    assert dec.cold_slots.tolist() == [r + 100 for r in want_decode]
    assert dec.tokens.tolist() == [plan.rows[r].q_start for r in want_decode]
    assert dec.chunk_tokens.tolist() == [rows[r][0] // BS * BS for r in want_decode]
    for i, r in enumerate(want_decode):
        for t, fraction in enumerate(FRACTIONS):
            assert int(dec.k[t, i]) == (kept_blocks(rows[r][0], fraction, BS, FLOOR, MIN_PROMPT) or 0)
    assert dec.k_max == max(1, int(dec.k.max()))
