"""Choose the rest of the budget split on the validation set: the floor, the sink and recent spans, the
observation window.

Validation set: ``eval.harness.VALIDATION`` (kept apart from ``hybridkv eval``'s prompts: the GFDL-1.2 text
instead of GPL-3, other needle depths and passkeys): its 6 NIAH prompts and its 2 long-text prompts (~2k tokens,
teacher-forced agreement with the full cache's 64-token greedy continuation, as the harness measures it).
Candidates: one parameter at a time away from the defaults (r and the retrieval unit were chosen first,
``validation_budget_split.py``), the hybridkv policy with the shipped profile at 5, 10 and 20 %. The choice
maximises NIAH hits summed over the budgets, then mean agreement; ties keep the default (a setting must earn its
change).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/validation_windows.py \\
        --out benchmarks/results/fidelity/validation_windows.md          # ~6 min on 1 CPU thread (SmolLM2)
"""
from __future__ import annotations

import platform
import time
from dataclasses import replace

from hybridkv_vllm.core import BudgetConfig, make_policy
from hybridkv_vllm.core.selection import SelectionConfig
from hybridkv_vllm.eval.harness import VALIDATION, niah_hits, text_agreement

import study

BLOCK = 16
#: (parameter, candidate values other than the default); BudgetConfig's or SelectionConfig's field names
CANDIDATES = [("floor_blocks", (1, 4)), ("sink_chunks", (2,)), ("sink_tokens", (16,)), ("recent_chunks", (2,)),
              ("recent_tokens", (64,)), ("obs_window", (16, 64))]


def configs(name: str, value) -> tuple[BudgetConfig, SelectionConfig]:
    budget, selection = BudgetConfig(1.0, block_size=BLOCK), SelectionConfig(chunk_size=BLOCK)
    if name in BudgetConfig.__dataclass_fields__:
        return replace(budget, **{name: value}), selection
    return budget, replace(selection, **{name: value})


def main() -> int:
    parser = study.parser(__doc__, budgets="0.05,0.1,0.2")
    args = parser.parse_args()
    started, lm, profile, budgets = study.start(args)
    default_budget, default_selection = BudgetConfig(1.0, block_size=BLOCK), SelectionConfig(chunk_size=BLOCK)
    grid = [("default", None)] + [(name, v) for name, values in CANDIDATES for v in values]
    policies = {}
    for name, value in grid:
        budget, selection = (default_budget, default_selection) if value is None else configs(name, value)
        for b in budgets:
            policies[name, value, b] = make_policy("hybridkv", profile, replace(budget, budget=b), selection)
    full = make_policy("full", profile, default_budget, default_selection)
    hits, full_hits, n = niah_hits(lm, full, policies, VALIDATION)
    agree, n_text = text_agreement(lm, full, policies, VALIDATION)
    niah = {c: sum(hits[(*c, b)] for b in budgets) for c in grid}
    mean_agree = {c: sum(agree[(*c, b)] for b in budgets) / len(budgets) for c in grid}
    best = max(grid, key=lambda c: (niah[c], round(mean_agree[c], 6), c[1] is None))
    default_of = {name: getattr(default_budget if name in BudgetConfig.__dataclass_fields__ else default_selection,
                                name) for name, _ in CANDIDATES}
    lines = [f"# Floor, spans and observation window on the validation set: `{args.model.name}`", "",
             f"Profile `{args.profile.name}` ({int(profile.is_static.sum())} of {profile.is_static.numel()} heads "
             f"static); r {default_budget.r:g}, {BLOCK // default_selection.sub_chunks}-token retrieval units "
             f"(chosen first: validation_budget_split.md); blocks of {BLOCK} tokens. Validation set "
             f"(`eval.harness.VALIDATION`): {n} NIAH prompts (haystack `{VALIDATION.haystack}`, lengths "
             f"{list(VALIDATION.niah_lengths)}, depths {list(VALIDATION.niah_depths)}, seed {VALIDATION.niah_seed}; "
             f"full cache {full_hits}/{n}) and {n_text} long-text prompts of ~{VALIDATION.text_tokens} tokens from "
             f"the same text (agreement over {VALIDATION.gen_tokens} tokens); {platform.machine()}, 1 thread.",
             "", "Defaults: " + ", ".join(f"`{k}` {v}" for k, v in default_of.items()) + ".", "",
             "| setting | " + " | ".join(f"NIAH {b:.0%}" for b in budgets) + " | NIAH sum | "
             + " | ".join(f"agreement {b:.0%}" for b in budgets) + " | mean agreement |",
             "|---|" + "---:|" * (2 * len(budgets) + 2)]
    for c in grid:
        label = "defaults" if c[1] is None else f"`{c[0]}` {c[1]}"
        mark = " **(chosen)**" if c == best else ""
        lines.append(f"| {label}{mark} | " + " | ".join(str(hits[(*c, b)]) for b in budgets) + f" | {niah[c]} | "
                     + " | ".join(f"{agree[(*c, b)]:.1%}" for b in budgets) + f" | {mean_agree[c]:.1%} |")
    lines += ["", "Chosen: " + ("the defaults (no candidate did better)" if best[1] is None
                                else f"`{best[0]}` {best[1]} (default {default_of[best[0]]})") + ".",
              f"Wall time {time.perf_counter() - started:.0f} s."]
    return study.write(args.out, lines)


if __name__ == "__main__":
    raise SystemExit(main())
