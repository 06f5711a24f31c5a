"""Choose the budget split's free parameters on a validation set kept apart from ``hybridkv eval``'s prompts.

Validation set: NIAH passkey prompts built exactly like the eval's (same instruction, needle sentence, question and
check) but over another haystack, Debian's GFDL-1.2 text (the eval's is GPL-3; the calibration set's texts are
other licences), at other needle depths (0.25, 0.75 against the eval's 0.1, 0.5, 0.9) and other passkeys
(seed 1): 3 lengths x 2 depths = 6 prompts. Candidates: ``sub_chunks`` (retrieval units per 16-token block) and
``r`` (per-head budget ratio dynamic : static), the hybridkv policy with the shipped profile at 5 % and 10 %. The
choice maximises validation hits summed over both budgets; ties go to the cheaper setting (fewer units: fewer
summaries in the cold tier and fewer scores per step; then r = 1).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/validation_budget_split.py \\
        --out benchmarks/results/fidelity/validation_budget_split.md        # ~6 min on 1 CPU thread (SmolLM2)
"""
from __future__ import annotations

import itertools
import platform
import time

from hybridkv_vllm.core import BudgetConfig, make_policy
from hybridkv_vllm.core.selection import SelectionConfig
from hybridkv_vllm.eval.harness import VALIDATION, niah_hits

import study

BLOCK = 16
OBS_WINDOW = 32            # the default when this ran (validation_windows.py chose 16 after it)


def main() -> int:
    parser = study.parser(__doc__)
    parser.add_argument("--subs", default="1,2")
    parser.add_argument("--rs", default="0.5,1,2")
    args = parser.parse_args()
    started, lm, profile, budgets = study.start(args)
    grid = list(itertools.product([int(s) for s in args.subs.split(",")], [float(r) for r in args.rs.split(",")]))
    policies = {(sub, r, b): make_policy("hybridkv", profile, BudgetConfig(b, r=r, block_size=BLOCK),
                                         SelectionConfig(chunk_size=BLOCK, sub_chunks=sub,
                                                         obs_window=OBS_WINDOW))
                for sub, r in grid for b in budgets}
    full = make_policy("full", profile, BudgetConfig(1.0, block_size=BLOCK))
    hits, full_hits, n = niah_hits(lm, full, policies, VALIDATION)
    total = {(sub, r): sum(hits[sub, r, b] for b in budgets) for sub, r in grid}
    best = max(grid, key=lambda c: (total[c], -c[0], -abs(c[1] - 1.0)))
    lines = [f"# Budget split chosen on a validation set: `{args.model.name}`", "",
             f"Profile `{args.profile.name}` ({int(profile.is_static.sum())} of {profile.is_static.numel()} heads "
             f"static); validation NIAH: haystack `{VALIDATION.haystack}`, lengths {list(VALIDATION.niah_lengths)} "
             f"tokens, depths {list(VALIDATION.niah_depths)}, seed {VALIDATION.niah_seed}: {n} prompts (full cache "
             f"{full_hits}/{n}); {platform.machine()}, 1 thread.", "",
             "| retrieval unit | r | " + " | ".join(f"{b:.0%}" for b in budgets) + " | sum |",
             "|---|---:|" + "---:|" * (len(budgets) + 1)]
    for sub, r in grid:
        mark = " **(chosen)**" if (sub, r) == best else ""
        lines.append(f"| {BLOCK // sub} tokens | {r:g} | " + " | ".join(str(hits[sub, r, b]) for b in budgets)
                     + f" | {total[sub, r]}{mark} |")
    lines += ["", f"Chosen: `sub_chunks` {best[0]} ({BLOCK // best[0]}-token units at 16-token blocks), "
                  f"`r` {best[1]:g}.",
              f"Wall time {time.perf_counter() - started:.0f} s."]
    return study.write(args.out, lines)


if __name__ == "__main__":
    raise SystemExit(main())
