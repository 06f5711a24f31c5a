"""Retrieval granularity ablation: NIAH passkey hits of ``hybridkv eval``'s prompts when dynamic heads retrieve
units finer than a block (``SelectionConfig.sub_chunks``), at the same budgets in whole blocks.

Same prompts, greedy decoding and passkey check as the harness; the ``hybridkv`` policy with the shipped profile,
and with every head dynamic (theta = 1.0, so that retrieval alone is measured), at 16-token blocks retrieved in
16-, 8- and 4-token units. Also prints the cold tier's extra host memory for the finer summaries: two fp32 vectors
(min, max) of D channels per unit, against the K and V of the unit's tokens.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ablation_retrieval_unit.py \\
        --out benchmarks/results/fidelity/ablation_retrieval_unit.md          # ~5 min on 1 CPU thread
"""
from __future__ import annotations

import time

from hybridkv_vllm.core import BudgetConfig, HeadProfile, make_policy
from hybridkv_vllm.core.selection import SelectionConfig
from hybridkv_vllm.eval.harness import EvalConfig, niah_hits

import study


# The settings the committed results were made with (before r, sub_chunks and obs_window became the validated
# defaults)
R = 1.0
OBS_WINDOW = 32
WORKLOAD = EvalConfig(niah_lengths=(1000, 2000, 3400))
BLOCK = 16


def main() -> int:
    parser = study.parser(__doc__)
    parser.add_argument("--subs", default="1,2,4", help="retrieval units per 16-token block")
    args = parser.parse_args()
    started, lm, profile, budgets = study.start(args)
    all_dynamic = HeadProfile.from_scores(profile.model, profile.scores, theta=1.0)
    subs = [int(s) for s in args.subs.split(",")]
    n_static = int(profile.is_static.sum())
    profiles = {f"shipped profile ({n_static} static)": profile, "all heads dynamic": all_dynamic}
    policies = {(name, sub, budget): make_policy("hybridkv", prof, BudgetConfig(budget, r=R, block_size=BLOCK),
                                                 SelectionConfig(chunk_size=BLOCK, sub_chunks=sub,
                                                                 obs_window=OBS_WINDOW))
                for name, prof in profiles.items() for sub in subs for budget in budgets}
    full = make_policy("full", profile, BudgetConfig(1.0, block_size=BLOCK))
    hits, full_hits, n_prompts = niah_hits(lm, full, policies, WORKLOAD)
    d = profile.model.head_dim
    lines = [f"# Retrieval unit ablation: NIAH passkey hits of {n_prompts} prompts (`{args.model.name}`)", "",
             f"`benchmarks/ablation_retrieval_unit.py --budgets {args.budgets} --subs {args.subs}`; "
             f"{time.perf_counter() - started:.0f} s wall, 1 thread; blocks of {BLOCK} tokens, budgets in whole "
             "blocks; the sink block and the prompt's last complete block are always retrieved whole.", "",
             "| profile | retrieval unit | summaries per cold token (bf16 K+V = 4D B) | "
             + " | ".join(f"{b:.0%}" for b in budgets) + " |",
             "|---|---|---|" + "---:|" * len(budgets)]
    for name in profiles:
        for sub in subs:
            unit = BLOCK // sub
            extra = 2 * d * 4 / unit                                 # fp32 min + max per unit, per token
            lines.append(f"| {name} | {unit} tokens | {extra:.0f} B = {extra / (4 * d):.0%} of K+V | "
                         + " | ".join(f"{hits[name, sub, b]}/{n_prompts}" for b in budgets) + " |")
    lines.append("| full cache | - | - | " + " | ".join(f"{full_hits}/{n_prompts}" for _ in budgets) + " |")
    return study.write(args.out, lines)


if __name__ == "__main__":
    raise SystemExit(main())
