"""Head-type ablation on the NIAH prompts of ``hybridkv eval`` (the paper's Table 4 question, on our model).

Same prompts, same greedy decoding and passkey check as the harness; the ``hybridkv`` policy is run with the
shipped profile and with the profile re-thresholded so that every head is dynamic (theta = 1.0) or every head is
static (theta = 0.0, static budgets weighted by 1 - s), next to the full cache and the SnapKV baseline.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ablation_head_types.py \
        --out benchmarks/results/fidelity/ablation_head_types.md          # ~3 min on 1 CPU thread
"""
from __future__ import annotations

import time

from hybridkv_vllm.core import BudgetConfig, HeadProfile, SelectionConfig, make_policy
from hybridkv_vllm.eval.harness import EvalConfig, niah_hits

import study


# The settings the committed results were made with (before r, sub_chunks and obs_window became the validated
# defaults)
R = 1.0
SELECTION = SelectionConfig(sub_chunks=1, obs_window=32)
WORKLOAD = EvalConfig(niah_lengths=(1000, 2000, 3400))


def variants(profile: HeadProfile, budget: float) -> dict[str, object]:
    cfg = BudgetConfig(budget, r=R)
    rethreshold = lambda theta: HeadProfile.from_scores(profile.model, profile.scores, theta=theta)  # noqa: E731
    n_static = int(profile.is_static.sum())
    return {
        f"shipped profile ({n_static} static / {profile.is_static.numel() - n_static} dynamic)":
            make_policy("hybridkv", profile, cfg, SELECTION),
        "all heads dynamic (theta = 1.0)": make_policy("hybridkv", rethreshold(1.0), cfg, SELECTION),
        "all heads static (theta = 0.0, budgets weighted by 1 - s)":
            make_policy("hybridkv", rethreshold(0.0), cfg, SELECTION),
        "SnapKV baseline (uniform budgets)": make_policy("snapkv", profile, cfg, SELECTION),
    }


def main() -> int:
    parser = study.parser(__doc__)
    args = parser.parse_args()
    started, lm, profile, budgets = study.start(args)
    policies = {(name, budget): policy for budget in budgets for name, policy in variants(profile, budget).items()}
    hits, full_hits, n_prompts = niah_hits(lm, make_policy("full", profile, BudgetConfig(1.0)), policies, WORKLOAD)
    names = list(variants(profile, budgets[0]))
    lines = [f"# Head-type ablation: NIAH passkey hits of {n_prompts} prompts (`{args.model.name}`)", "",
             f"`{' '.join(['benchmarks/ablation_head_types.py', '--budgets', args.budgets])}`; "
             f"{time.perf_counter() - started:.0f} s wall, 1 thread", "",
             "| variant | " + " | ".join(f"{b:.0%}" for b in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    lines += [f"| {n} | " + " | ".join(f"{hits[n, b]}/{n_prompts}" for b in budgets) + " |" for n in names]
    lines.append("| full cache | " + " | ".join(f"{full_hits}/{n_prompts}" for _ in budgets) + " |")
    return study.write(args.out, lines)


if __name__ == "__main__":
    raise SystemExit(main())
