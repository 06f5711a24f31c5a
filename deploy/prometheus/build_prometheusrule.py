#!/usr/bin/env python3
"""Write deploy/prometheus/prometheusrule.yaml: hybridkv-rules.yaml wrapped in a prometheus-operator PrometheusRule.

hybridkv-rules.yaml is the source (promtool checks and unit-tests it); tests/deploy checks the two agree:
    python deploy/prometheus/build_prometheusrule.py            # rewrite prometheusrule.yaml
    python deploy/prometheus/build_prometheusrule.py --check    # exit 1 if it is stale
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
SRC = HERE / "hybridkv-rules.yaml"
OUT = HERE / "prometheusrule.yaml"
HEADER = ("# GENERATED from hybridkv-rules.yaml by build_prometheusrule.py; edit that file, not this one.\n"
          "# kube-prometheus-stack only loads PrometheusRules matching its ruleSelector (often a `release` label):\n"
          "# add that label in your own overlay if needed.\n")


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False):  # indent sequences (yamllint)
        return super().increase_indent(flow, False)


def _str(dumper: yaml.SafeDumper, s: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _str)


def render() -> str:
    rules = yaml.safe_load(SRC.read_text())
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "hybridkv-vllm",
                     "labels": {"app.kubernetes.io/name": "hybridkv-vllm",
                                "app.kubernetes.io/part-of": "hybridkv-vllm"}},
        "spec": rules,
    }
    return HEADER + yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=100, default_flow_style=False)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python deploy/prometheus/build_prometheusrule.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
