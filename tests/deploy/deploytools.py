"""Helpers for tests/deploy: where the checkers are, rendering kustomizations, and PromQL metric-name checks.

The checkers are installed by scripts/setup_deploy_tools.sh (kubernetes-validate, check-jsonschema, yamllint,
hadolint into .venv/bin; promtool unpacked from Debian's `prometheus` into .venv/opt and linked into .venv/bin;
kubectl is preinstalled). A missing tool is a test failure, not a skip: CI must not pass without the checks.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("gpu", "cpu-demo")
# Oldest Kubernetes minor we promise to support, and the newest kubernetes-validate 1.37.0 knows.
K8S_VERSIONS = ("1.29.0", "1.37.0")
# CRD kinds kubernetes-validate has no schema for -> vendored schema (deploy/schemas/README.md).
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): DEPLOY / "schemas/monitoring.coreos.com/servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): DEPLOY / "schemas/monitoring.coreos.com/prometheusrule_v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): DEPLOY / "schemas/keda.sh/scaledobject_v1alpha1.json",
}
SETUP_HINT = "run `bash scripts/setup_deploy_tools.sh`"


def tool(name: str) -> str:
    """Absolute path of a checker: the venv's bin first (next to this interpreter), then PATH."""
    for cand in (Path(sys.executable).parent / name, ROOT / ".venv/bin" / name):
        if cand.exists() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed: {SETUP_HINT}")
    return found


def run(args: list[str], cwd: Path | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)


@lru_cache(maxsize=None)
def render_text(kustomization: str) -> str:
    """`kubectl kustomize deploy/<kustomization>` (offline: kustomize is built into kubectl)."""
    r = run([tool("kubectl"), "kustomize", str(DEPLOY / kustomization)])
    assert r.returncode == 0, f"kubectl kustomize deploy/{kustomization} failed:\n{r.stderr}"
    return r.stdout


def render(kustomization: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(render_text(kustomization)) if d]


def served_as_deployed(objs: list[dict], port: int, model_dir: Path, tmp: Path) -> tuple[list[str], dict[str, str]]:
    """The rendered Deployment's ``vllm serve`` as the kubelet starts it, on this machine: its command and args
    (``$(VAR)`` expanded from the container's env) and its env (no variable added), with only what points into
    the pod moved here: the model path (baked into the image) -> ``model_dir``, the profile's ConfigMap mount ->
    the rendered ConfigMap's content in ``tmp``, env values under a volume mount -> ``tmp``, ``--host`` ->
    loopback, ``--port`` -> ``port``. Returns ``(argv, env)``; ``env`` is this process's environment (PATH, the
    venv) without ``PROMETHEUS_MULTIPROC_DIR``, plus the container's values."""
    (c,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["vllm", "serve"], c["command"]
    literal = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    args = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: literal[m.group(1)], a) for a in c["args"]]
    assert args[0] == literal.get("HYBRIDKV_MODEL"), "the model is the first argument"
    args[0] = str(model_dir)
    for name, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        args[args.index(name) + 1] = value
    i = args.index("--additional-config") + 1
    config = json.loads(args[i])
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].startswith("hybridkv-profile")]
    mounted = Path(config["hybridkv"]["profile"])
    profile = tmp / mounted.name
    profile.write_text(cm["data"][mounted.name])
    config["hybridkv"]["profile"] = str(profile)
    args[i] = json.dumps(config)
    mounts = [vm["mountPath"].rstrip("/") for vm in c.get("volumeMounts", [])]
    env = {k: v for k, v in os.environ.items() if k.upper() != "PROMETHEUS_MULTIPROC_DIR"}
    for name, value in literal.items():
        under = [m for m in mounts if value == m or value.startswith(m + "/")]
        env[name] = str(tmp / "volumes" / value.lstrip("/")) if under else value
    return [str(Path(sys.executable).with_name("vllm")), "serve", *args], env


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind]


def one(objs: list[dict], kind: str) -> dict:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------------------------------------------
# Metric names that exist: vLLM's (parsed from the installed vllm/v1/metrics/loggers.py, so a vLLM upgrade that
# renames a metric fails here) and the plugin's (hybridkv_vllm/adapter/metrics.py).
# ---------------------------------------------------------------------------------------------------------------
_CLS_TYPES = {"_gauge_cls": "gauge", "_counter_cls": "counter", "_histogram_cls": "histogram",
              "Gauge": "gauge", "Counter": "counter", "Histogram": "histogram"}


def vllm_loggers_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations, "vllm is not installed in this venv"
    return Path(list(spec.submodule_search_locations)[0]) / "v1" / "metrics" / "loggers.py"


def exposed(name: str, mtype: str) -> set[str]:
    if mtype == "counter":
        base = name[:-6] if name.endswith("_total") else name
        return {base + "_total"}
    if mtype == "histogram":
        return {name + s for s in ("_bucket", "_sum", "_count")}
    return {name}


@lru_cache(maxsize=None)
def vllm_metric_families() -> dict[str, str]:
    """{family name: type} for every `vllm:` metric constructed in loggers.py (static AST scan)."""
    tree = ast.parse(vllm_loggers_path().read_text())
    fams: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        cls = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
        if cls not in _CLS_TYPES:
            continue
        for kw in node.keywords:
            if kw.arg == "name" and isinstance(kw.value, ast.Constant) and str(kw.value.value).startswith("vllm:"):
                fams[kw.value.value] = _CLS_TYPES[cls]
    # `name = "vllm:cache_config_info"` then `self._gauge_cls(name=name, ...)` (info metrics emulated by gauges)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            v = node.value.value
            if isinstance(v, str) and v.startswith("vllm:") and v.endswith("_info"):
                fams.setdefault(v, "gauge")
    return fams


@lru_cache(maxsize=None)
def known_metric_names() -> frozenset[str]:
    from hybridkv_vllm.adapter import metrics as M

    names = set(M.exposed_metric_names())
    for fam, mtype in vllm_metric_families().items():
        names |= exposed(fam, mtype)
    return frozenset(names)


# ---------------------------------------------------------------------------------------------------------------
# PromQL: grafana variables -> concrete values, and the metric names an expression selects.
# ---------------------------------------------------------------------------------------------------------------
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "${datasource}": "prometheus",
                "$model_name": ".*"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan", "atan2"}


def substitute_grafana_vars(expr: str) -> str:
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (not functions, labels, keywords or numbers)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)   # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)                                            # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)                                            # range / subquery
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)
    names = set()
    for m in re.finditer(r"(?<![0-9A-Za-z_:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", s):
        ident, call = m.group(1), m.group(2)
        if call or ident.lower() in _KEYWORDS:
            continue
        names.add(ident)
    return names


def promtool_parse(exprs: dict[str, str], tmpdir: Path) -> subprocess.CompletedProcess:
    """Parse each expression with promtool (as a recording rule); returns promtool's result."""
    rules = {"groups": [{"name": "parse-check", "rules": [
        {"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs.values())]}]}
    f = tmpdir / "exprs.rules.yaml"
    f.write_text(yaml.safe_dump(rules, sort_keys=False))
    return run([tool("promtool"), "check", "rules", str(f)])


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana/hybridkv-vllm.json").read_text())


def dashboard_targets(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every query target, rows' nested panels included."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", ""), t["expr"]))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    return out
