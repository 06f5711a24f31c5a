"""The profiler's short report: per-layer static/dynamic counts (text table + markdown) and a score histogram."""
from __future__ import annotations

from pathlib import Path

from hybridkv_vllm.core.profile import HeadProfile

__all__ = ["layer_table", "markdown_report", "score_histogram", "write_report"]


def layer_table(profile: HeadProfile) -> list[tuple[int, int, int, float, float]]:
    """Rows ``(layer, n_static, n_dynamic, min score, max score)``."""
    rows = []
    for i, layer in enumerate(profile.layers):
        n_s = sum(e.type == "static" for e in layer)
        scores = [e.score for e in layer]
        rows.append((i, n_s, len(layer) - n_s, min(scores), max(scores)))
    return rows


def text_table(profile: HeadProfile) -> str:
    """The per-layer table as fixed-width text (for the terminal)."""
    lines = [f"{'layer':>5} {'static':>6} {'dynamic':>7} {'min s':>7} {'max s':>7}"]
    lines += [f"{i:>5} {s:>6} {d:>7} {lo:>7.4f} {hi:>7.4f}" for i, s, d, lo, hi in layer_table(profile)]
    n_s = int(profile.is_static.sum())
    n = profile.is_static.numel()
    lines.append(f"total: {n_s} static / {n - n_s} dynamic of {n} KV heads (theta = {profile.classification.theta})")
    return "\n".join(lines)


def markdown_report(profile: HeadProfile, seconds: float | None = None, histogram: str | None = None) -> str:
    """A markdown report: summary, per-layer table, and the histogram image if given."""
    n_s = int(profile.is_static.sum())
    n = profile.is_static.numel()
    prov = profile.provenance
    out = [f"# Head profile: {prov.get('model_path', profile.model.architecture)}", "",
           f"- model: {profile.model.architecture}, {profile.model.num_layers} layers x "
           f"{profile.model.num_kv_heads} KV heads ({profile.model.num_q_heads} query heads), "
           f"`{profile.model.fingerprint[:19]}...`",
           f"- calibration: {prov.get('calibration', '?')}; statistic `{profile.classification.statistic}` on "
           f"`{profile.classification.query_set}` queries, `{profile.classification.aggregation}`; scored at "
           f"context lengths {list(profile.classification.reference_tokens)}",
           f"- theta = {profile.classification.theta}: **{n_s} static / {n - n_s} dynamic** of {n} KV heads"]
    if seconds is not None:
        out.append(f"- profiling time: {seconds:.1f} s")
    out += ["", "| layer | static | dynamic | min score | max score |", "|---:|---:|---:|---:|---:|"]
    out += [f"| {i} | {s} | {d} | {lo:.4f} | {hi:.4f} |" for i, s, d, lo, hi in layer_table(profile)]
    if histogram:
        out += ["", f"![score histogram]({histogram})"]
    return "\n".join(out) + "\n"


def score_histogram(profile: HeadProfile, path: str | Path) -> None:
    """PNG histogram of the sparsity scores, static and dynamic heads stacked, theta marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    theta = profile.classification.theta
    static = [e.score for layer in profile.layers for e in layer if e.type == "static"]
    dynamic = [e.score for layer in profile.layers for e in layer if e.type == "dynamic"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist([dynamic, static], bins=[i / 40 for i in range(41)], stacked=True, color=["tab:orange", "tab:blue"],
            label=[f"dynamic ({len(dynamic)})", f"static ({len(static)})"])
    ax.axvline(theta, color="k", linestyle="--", linewidth=1, label=f"theta = {theta}")
    ax.set_xlabel("text-centric sparsity score s = 1 - k90 / n_keys")
    ax.set_ylabel("KV heads")
    ax.set_title(f"{profile.model.architecture}: {profile.model.num_layers} x {profile.model.num_kv_heads} KV heads",
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def write_report(profile: HeadProfile, out_dir: str | Path, seconds: float | None = None) -> dict[str, Path]:
    """Write ``report.md`` and ``score_histogram.png`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "score_histogram.png"
    score_histogram(profile, png)
    md = out_dir / "report.md"
    md.write_text(markdown_report(profile, seconds, histogram=png.name), encoding="utf-8")
    return {"markdown": md, "histogram": png}
