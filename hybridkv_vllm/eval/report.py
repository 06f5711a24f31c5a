"""Writes the harness's outputs: ``results.json``, ``table.md`` (summary + goals) and ``plot.png``."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["markdown_table", "plot", "redraw", "write_outputs"]

_METHOD_STYLE = {"full": ("k", "--"), "hybridkv": ("tab:red", "-"), "streaming": ("tab:blue", "-"),
                 "snapkv": ("tab:green", "-"), "random": ("tab:gray", "-")}


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f} %" if pct else f"{x:.4f}"


def markdown_table(doc: dict) -> str:
    """Summary table (one row per budget x method) and the goals."""
    meta = doc.get("meta", {})
    lines = [f"# Fidelity vs the full cache: `{meta.get('model', '?')}`", "",
             f"profile `{meta.get('profile', '?')}`; {meta.get('dtype', '?')}, {meta.get('threads', '?')} thread(s), "
             f"{meta.get('machine', '?')}; wall time {meta.get('wall_s', '?')} s"
             + (" (**--quick**)" if meta.get("quick") else ""), "",
             "NIAH = passkey hits (greedy); agreement = teacher-forced top-1 agreement with the full cache's greedy "
             "continuation; KL = mean KL(full || method) in nats over the same positions; kept = mean share of "
             "prompt tokens a head attends to at the first decode step.", "",
             "| budget | method | NIAH | agreement text | agreement mm | KL text | KL mm | kept |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for e in doc["summary"]:
        lines.append(f"| {100 * e['budget']:.0f} % | {e['method']} | {_fmt(e['niah_acc'], True)} | "
                     f"{_fmt(e['agreement_text'], True)} | {_fmt(e['agreement_mm'], True)} | {_fmt(e['kl_text'])} | "
                     f"{_fmt(e['kl_mm'])} | {_fmt(e['kept_fraction'], True)} |")
    g = doc.get("goals", {})
    lines += ["", "## Goals", ""]
    if "niah_equal_full_at_10pct" in g:
        x = g["niah_equal_full_at_10pct"]
        lines.append(f"- NIAH equal to the full cache at 10 %: hybridkv {_fmt(x['hybridkv'], True)} vs full "
                     f"{_fmt(x['full'], True)}: **{'met' if x['met'] else 'missed'}**")
    if "agreement_ge_95pct_at_20pct" in g:
        x = g["agreement_ge_95pct_at_20pct"]
        lines.append(f"- greedy agreement >= 95 % at 20 %: hybridkv {_fmt(x['hybridkv'], True)}: "
                     f"**{'met' if x['met'] else 'missed'}**")
    b = g.get("better_than_baselines")
    if b and b["comparisons"]:
        lost = [c for c in b["comparisons"] if not c["hybridkv_at_least_as_good"]]
        lines.append(f"- at least as good as every baseline at equal budget: "
                     f"**{'met' if b['met'] else 'missed'}** ({len(b['comparisons']) - len(lost)} of "
                     f"{len(b['comparisons'])} comparisons)")
        for c in lost:
            lines.append(f"  - {100 * c['budget']:.0f} % {c['metric']}: {c['baseline']} {c['baseline_value']:.4f} "
                         f"vs hybridkv {c['hybridkv']:.4f}")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: str | Path) -> None:
    """Fidelity vs budget, one line per method: NIAH accuracy, agreement, KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = doc["summary"]
    methods = list(dict.fromkeys(e["method"] for e in summary))
    panels = [("niah_acc", "NIAH passkey accuracy"), ("agreement", "greedy agreement (text + mm)"),
              ("kl", "mean KL(full || method), nats")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    for ax, (key, title) in zip(axes, panels):
        for m in methods:
            pts = [(e["budget"], e[key]) for e in summary if e["method"] == m and e[key] is not None]
            if not pts:
                continue
            color, style = _METHOD_STYLE.get(m, (None, "-"))
            ax.plot([100 * x for x, _ in pts], [y for _, y in pts], style, marker="o", color=color, label=m)
        ax.set_xscale("log")
        ax.minorticks_off()
        budgets = sorted({e["budget"] for e in summary})
        ax.set_xticks([100 * b for b in budgets], [f"{100 * b:g}" for b in budgets])
        ax.set_xlabel("KV budget, % of the full cache")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"HybridKV fidelity vs budget: {doc.get('meta', {}).get('model', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def redraw(out_dir: str | Path) -> None:
    """Rewrite ``table.md`` and ``plot.png`` of ``out_dir`` from its ``results.json`` (no model run)."""
    out = Path(out_dir)
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    (out / "table.md").write_text(markdown_table(doc), encoding="utf-8")
    plot(doc, out / "plot.png")


def write_outputs(doc: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "table": out / "table.md", "plot": out / "plot.png"}
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    paths["table"].write_text(markdown_table(doc), encoding="utf-8")
    plot(doc, paths["plot"])
    return paths
