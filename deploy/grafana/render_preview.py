#!/usr/bin/env python3
"""Draw the Grafana dashboard (hybridkv-vllm.json) from a running Prometheus into one PNG, without Grafana.

Every panel of the dashboard is drawn where its gridPos puts it: each timeseries target is a Prometheus range
query (/api/v1/query_range) drawn as lines with the panel's legend format and unit (the right-axis override too);
a stat panel shows its last value over a sparkline; the table panel runs its instant query at --end. Grafana's
variables are replaced as Grafana would on a short range: $model_name -> .* (All), $__rate_interval ->
--rate-interval. It is a preview, not a pixel copy of Grafana.

    python deploy/grafana/render_preview.py --prometheus http://127.0.0.1:19090 --out dashboard.png \
        [--start UNIX --end UNIX | --range 10m] [--step 1s] [--rate-interval 15s]

The committed deploy/grafana/dashboard_live.png was drawn by tests/deploy/test_deploy_live_prometheus.py from
the Prometheus that scraped its live `vllm serve` (the command is in deploy/README.md, "Live check").
Needs matplotlib; prints one line per panel (series count, last values, or "no data").
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DASHBOARD = Path(__file__).with_name("hybridkv-vllm.json")
GRID_COLS = 24
ROW_UNIT_IN = 0.36          # inches per Grafana grid row (Grafana: 30 px + 8 px margin)
WIDTH_IN = 22.0


def parse_duration(s: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {s!r} (e.g. 15s, 10m)")
    return float(m.group(1)) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _get(self, path: str, params: dict) -> dict:
        req = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
        if body.get("status") != "success":
            raise RuntimeError(f"{params.get('query')}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                                 "step": f"{step:g}"})["result"]

    def instant(self, expr: str, at: float) -> list[dict]:
        return self._get("/api/v1/query", {"query": expr, "time": f"{at:.3f}"})["result"]


def substitute(expr: str, rate_interval: str, step: str) -> str:
    for k, v in {"$__rate_interval": rate_interval, "$__interval": step, "$__range": "1h",
                 "$model_name": ".*"}.items():
        expr = expr.replace(k, v)
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable in {expr!r}")
    return expr


def legend(fmt: str, metric: dict, expr: str) -> str:
    if not fmt:
        return ",".join(f"{k}={v}" for k, v in metric.items() if k != "__name__") or expr[:40]
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt).strip()


# --- units (Grafana's names) -----------------------------------------------------------------------------------
def _scaled(v: float, base: float, units: list[str]) -> str:
    i = 0
    while abs(v) >= base and i < len(units) - 1:
        v, i = v / base, i + 1
    return f"{v:.3g} {units[i]}".strip()


def fmt_value(v: float, unit: str, decimals: int | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NaN"
    if unit == "bytes":
        return _scaled(v, 1024, ["B", "KiB", "MiB", "GiB", "TiB"])
    if unit == "Bps":
        return _scaled(v, 1024, ["B/s", "KiB/s", "MiB/s", "GiB/s"])
    if unit == "percentunit":
        return f"{v * 100:.{1 if decimals is None else decimals}f}%"
    if unit == "s":
        return f"{v * 1e3:.3g} ms" if abs(v) < 1 else f"{v:.3g} s"
    if unit == "reqps":
        return f"{v:.3g} req/s"
    if decimals is not None:
        return f"{v:.{decimals}f}"
    return _scaled(v, 1000, ["", "K", "M", "G", "T"])


def series_arrays(result: list[dict]):
    for s in result:
        ts = [dt.datetime.fromtimestamp(float(t), dt.timezone.utc) for t, _ in s["values"]]
        vs = [float(v) for _, v in s["values"]]
        yield s["metric"], ts, vs


def last_finite(vs: list[float]) -> float | None:
    for v in reversed(vs):
        if math.isfinite(v):
            return v
    return None


# --- drawing -----------------------------------------------------------------------------------------------------
def panel_axes(fig, grid, total_h: int, top_in: float):
    x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
    fig_w, fig_h = fig.get_size_inches()
    pad_left, pad_right, pad_top, pad_bottom = 0.9, 0.75, 0.42, 0.55   # inches (room for the axis labels)
    left = x / GRID_COLS + pad_left / fig_w
    width = w / GRID_COLS - (pad_left + pad_right) / fig_w
    top = top_in + y * ROW_UNIT_IN + pad_top
    height = h * ROW_UNIT_IN - pad_top - pad_bottom
    return fig.add_axes([left, 1 - (top + height) / fig_h, width, height / fig_h])


def draw_timeseries(ax, panel, prom, args, log):
    import matplotlib.dates as mdates

    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    right_res = []
    for ov in panel["fieldConfig"].get("overrides", []):
        props = {p["id"]: p["value"] for p in ov["properties"]}
        if ov["matcher"]["id"] == "byRegexp" and props.get("custom.axisPlacement") == "right":
            right_res.append((re.compile(ov["matcher"]["options"]), props.get("unit", unit)))
    ax2, right_unit, n, lines = None, None, 0, []
    stacked = panel["fieldConfig"]["defaults"].get("custom", {}).get("stacking", {}).get("mode") == "normal"
    stack_base: dict = {}
    zero: list[str] = []
    for t in panel["targets"]:
        expr = substitute(t["expr"], args.rate_interval, args.step)
        for metric, ts, vs in series_arrays(prom.range(expr, args.start, args.end, args.step_s)):
            name = legend(t.get("legendFormat", ""), metric, expr)
            n += 1
            if stacked and all(v == 0 or not math.isfinite(v) for v in vs):
                zero.append(name)          # a stack of flat zeros only hides the others: named below instead
                log.append(f"  {name}: 0 throughout")
                continue
            target_ax, u = ax, unit
            for rx, ru in right_res:
                if rx.fullmatch(name):
                    if ax2 is None:
                        ax2 = ax.twinx()
                    target_ax, u, right_unit = ax2, ru, ru
            plot_vs = vs
            if stacked and target_ax is ax:
                base = [stack_base.get(t_, 0.0) for t_ in ts]
                plot_vs = [b + (v if math.isfinite(v) else 0.0) for b, v in zip(base, vs)]
                for t_, v in zip(ts, plot_vs):
                    stack_base[t_] = v
                ax.fill_between(ts, base, plot_vs, alpha=0.15, step=None)
            style = "--" if target_ax is ax2 else "-"
            (line,) = target_ax.plot(ts, plot_vs, style, lw=1.4, label=name)
            lines.append(line)
            lv = last_finite(vs)
            mx = max((v for v in vs if math.isfinite(v)), default=None)
            log.append(f"  {name}: max {fmt_value(mx, u) if mx is not None else 'NaN'}, "
                       f"last {fmt_value(lv, u) if lv is not None else 'NaN'}")
    if n == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=12, color="grey")
    ax.set_xlim(dt.datetime.fromtimestamp(args.start, dt.timezone.utc),
                dt.datetime.fromtimestamp(args.end, dt.timezone.utc))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=dt.timezone.utc))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=6))
    ax.tick_params(labelsize=7.5)
    ax.grid(alpha=0.3)
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_value(v, unit)))
    ax.set_ylim(bottom=min(0, ax.get_ylim()[0]))
    if ax2 is not None:
        if ax2.get_ylim()[1] <= 0.5:                    # all zero (e.g. no swap-in on this build): a 0..1 axis
            ax2.set_ylim(0, 1)
        ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_value(v, right_unit)))
        ax2.tick_params(labelsize=7.5)
        ax2.set_ylim(bottom=0)
    if lines:
        ax.legend(handles=lines, fontsize=7.5, loc="upper left", framealpha=0.7, ncol=2 if len(lines) > 3 else 1)
    if zero:
        head = ""
        if len(zero) > 1 and all(": " in z for z in zero) and len({z.split(": ", 1)[0] for z in zero}) == 1:
            head, zero = zero[0].split(": ", 1)[0] + ": ", [z.split(": ", 1)[1] for z in zero]
        ax.text(1.0, 1.02, textwrap.shorten(f"0 throughout, not drawn: {head}" + ", ".join(zero), 90),
                transform=ax.transAxes, ha="right", va="bottom", fontsize=7.5, color="#555")
    return n


def draw_stat(ax, panel, prom, args, log):
    d = panel["fieldConfig"]["defaults"]
    expr = substitute(panel["targets"][0]["expr"], args.rate_interval, args.step)
    result = prom.range(expr, args.start, args.end, args.step_s)
    ax.set_axis_off()
    if not result:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=14, color="grey")
        return 0
    metric, ts, vs = next(series_arrays(result))
    lv = last_finite(vs)
    ax.fill_between(ts, [v if math.isfinite(v) else 0 for v in vs], alpha=0.18, color="tab:blue")
    ax.plot(ts, vs, color="tab:blue", lw=1, alpha=0.6)
    ax.set_ylim(bottom=0, top=(max((v for v in vs if math.isfinite(v)), default=1) or 1) * 1.6)
    text = fmt_value(lv, d.get("unit", "none"), d.get("decimals")) if lv is not None else "NaN"
    ax.text(0.5, 0.55, text, ha="center", va="center", transform=ax.transAxes, fontsize=24, weight="bold",
            color="#1f60c4")
    log.append(f"  last {text}")
    return len(result)


def draw_table(ax, panel, prom, args, log):
    ax.set_axis_off()
    exclude = set()
    for tr in panel.get("transformations", []):
        if tr["id"] == "organize":
            exclude |= {k for k, v in tr["options"].get("excludeByName", {}).items() if v}
    rows, cols = [], []
    for t in panel["targets"]:
        expr = substitute(t["expr"], args.rate_interval, args.step)
        for s in prom.instant(expr, args.end):
            labels = {k: v for k, v in s["metric"].items() if k not in exclude}
            cols = cols or list(labels)
            rows.append([labels.get(c, "") for c in cols])
    if not rows:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=12, color="grey")
        return 0
    tbl = ax.table(cellText=rows, colLabels=cols, loc="upper center", cellLoc="left")
    tbl.auto_set_font_size(False)
    tbl.set_fontsize(8.5)
    tbl.scale(1, 1.5)
    for (r, _), cell in tbl.get_celld().items():
        if r == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#e8eef8")
    log.extend(f"  {dict(zip(cols, r))}" for r in rows)
    return len(rows)


def render(prom: Prometheus, dash: dict, args) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []

    def walk(ps):
        for p in ps:
            panels.append(p)
            walk(p.get("panels", []))

    walk(dash["panels"])
    total_h = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    header_in = 0.9
    fig = plt.figure(figsize=(WIDTH_IN, header_in + total_h * ROW_UNIT_IN))
    fig_h = fig.get_size_inches()[1]
    start_s = dt.datetime.fromtimestamp(args.start, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    end_s = dt.datetime.fromtimestamp(args.end, dt.timezone.utc).strftime("%H:%M:%S UTC")
    fig.text(0.01, 1 - 0.35 / fig_h, dash["title"], fontsize=18, weight="bold", va="center")
    fig.text(0.01, 1 - 0.72 / fig_h,
             f"Preview drawn by deploy/grafana/render_preview.py from Prometheus data ({start_s} - {end_s}; "
             f"model_name = All, $__rate_interval = {args.rate_interval}, step {args.step}). Not Grafana.",
             fontsize=9.5, color="#444", va="center")
    log: list[str] = []
    for p in panels:
        g = p["gridPos"]
        if p["type"] == "row":
            y_in = header_in + g["y"] * ROW_UNIT_IN + 0.5 * ROW_UNIT_IN
            fig.text(0.01, 1 - y_in / fig_h, p["title"], fontsize=13, weight="bold", va="center", color="#222")
            fig.add_artist(plt.Line2D([0.01, 0.99], [1 - (y_in + 0.2) / fig_h] * 2, color="#bbb", lw=0.8))
            continue
        ax = panel_axes(fig, g, total_h, header_in)
        title_y = 1 - (header_in + g["y"] * ROW_UNIT_IN + 0.2) / fig_h
        fig.text(g["x"] / GRID_COLS + 0.012, title_y, p["title"], fontsize=10.5, weight="bold", va="center")
        log.append(f"{p['type']} {p['title']!r}:")
        draw = {"timeseries": draw_timeseries, "stat": draw_stat, "table": draw_table}.get(p["type"])
        n = draw(ax, p, prom, args, log) if draw else 0
        if n == 0:
            log.append("  no data")
    fig.savefig(args.out, dpi=args.dpi, facecolor="white")
    plt.close(fig)
    return log


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:19090")
    ap.add_argument("--out", required=True, type=Path, help="PNG to write")
    ap.add_argument("--dashboard", type=Path, default=DASHBOARD)
    ap.add_argument("--start", type=float, help="unix seconds (default: --end minus --range)")
    ap.add_argument("--end", type=float, help="unix seconds (default: now)")
    ap.add_argument("--range", default="10m", help="used when --start is not given [10m]")
    ap.add_argument("--step", default="2s", help="range-query step [2s]")
    ap.add_argument("--rate-interval", default="1m",
                    help="what $__rate_interval becomes (Grafana: max(4 x scrape interval, step + scrape)) [1m]")
    ap.add_argument("--dpi", type=int, default=90)
    args = ap.parse_args(argv)
    args.end = args.end if args.end is not None else time.time()
    args.start = args.start if args.start is not None else args.end - parse_duration(args.range)
    args.step_s = parse_duration(args.step)
    parse_duration(args.rate_interval)
    if args.end <= args.start:
        ap.error("--end must be after --start")
    dash = json.loads(args.dashboard.read_text())
    log = render(Prometheus(args.prometheus), dash, args)
    print("\n".join(log))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
