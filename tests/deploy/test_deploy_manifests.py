"""Render every kustomization offline and validate what comes out: Kubernetes schemas (kubernetes-validate
--strict, oldest and newest supported versions), CRDs against the vendored schemas (check-jsonschema), yamllint."""
from __future__ import annotations

import pytest
import yaml

from deploytools import CRD_SCHEMAS, DEPLOY, K8S_VERSIONS, OVERLAYS, ROOT, by_kind, render, render_text, run, tool

KUSTOMIZATIONS = (*(f"overlays/{o}" for o in OVERLAYS), "grafana", "prometheus")


@pytest.mark.parametrize("k", KUSTOMIZATIONS)
def test_renders(k):
    objs = render(k)
    assert objs, f"deploy/{k} rendered nothing"
    for o in objs:
        assert o.get("apiVersion") and o.get("kind") and o.get("metadata", {}).get("name"), o


def test_overlays_render_the_expected_kinds():
    for o in OVERLAYS:
        kinds = sorted(x["kind"] for x in render(f"overlays/{o}"))
        assert kinds == sorted(["ConfigMap", "Deployment", "PersistentVolumeClaim", "PodDisruptionBudget",
                                "ScaledObject", "Service", "ServiceMonitor"]), (o, kinds)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("k", [k for k in KUSTOMIZATIONS if k != "prometheus"])  # prometheus: only a CRD
def test_kubernetes_validate_strict(k, version, tmp_path):
    objs = [o for o in render(k) if (o["apiVersion"], o["kind"]) not in CRD_SCHEMAS]
    assert objs
    f = tmp_path / "builtin.yaml"
    f.write_text(yaml.safe_dump_all(objs, sort_keys=False))
    r = run([tool("kubernetes-validate"), "--strict", "-k", version, str(f)])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    # kubernetes-validate only WARNs (rc 0) for a kind it has no schema for: that must not pass silently.
    assert "WARN" not in out and "ERROR" not in out, out
    assert out.count("passed for resource") == len(objs), out


@pytest.mark.parametrize("k", KUSTOMIZATIONS)
def test_crds_against_vendored_schemas(k, tmp_path):
    crds = [o for o in render(k) if (o["apiVersion"], o["kind"]) in CRD_SCHEMAS]
    unknown = [(o["apiVersion"], o["kind"]) for o in render(k)
               if "." in o["apiVersion"].split("/")[0] and (o["apiVersion"], o["kind"]) not in CRD_SCHEMAS
               and not o["apiVersion"].split("/")[0].endswith(".k8s.io")]
    assert not unknown, f"custom resources without a vendored schema: {unknown}"
    for i, o in enumerate(crds):
        f = tmp_path / f"{i}-{o['kind']}.yaml"
        f.write_text(yaml.safe_dump(o, sort_keys=False))
        r = run([tool("check-jsonschema"), "--schemafile", str(CRD_SCHEMAS[(o["apiVersion"], o["kind"])]), str(f)])
        assert r.returncode == 0, f"{o['kind']}/{o['metadata']['name']}:\n{r.stdout}{r.stderr}"


def test_check_jsonschema_rejects_a_bad_servicemonitor(tmp_path):
    """The CRD check has teeth: a typo'd field and a bad interval are caught."""
    sm = next(o for o in render("overlays/gpu") if o["kind"] == "ServiceMonitor")
    sm["spec"]["endpoints"][0]["interval"] = "fifteen"
    sm["spec"]["endpoints"][0]["prot"] = "http"
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(sm))
    r = run([tool("check-jsonschema"), "--schemafile", str(CRD_SCHEMAS[("monitoring.coreos.com/v1",
                                                                      "ServiceMonitor")]), str(f)])
    assert r.returncode == 1 and "fifteen" in r.stdout and "prot" in r.stdout, r.stdout + r.stderr


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path):
    dep = by_kind(render("overlays/gpu"), "Deployment")[0]
    dep["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(dep))
    r = run([tool("kubernetes-validate"), "--strict", "-k", K8S_VERSIONS[0], str(f)])
    assert r.returncode != 0 and "resourcez" in r.stdout + r.stderr


def test_yamllint():
    r = run([tool("yamllint"), "-f", "parsable", "-c", str(DEPLOY / ".yamllint.yaml"), str(DEPLOY)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_rendered_yaml_is_lint_clean(tmp_path):
    for k in KUSTOMIZATIONS:
        f = tmp_path / (k.replace("/", "_") + ".yaml")
        f.write_text(render_text(k))
        r = run([tool("yamllint"), "-f", "parsable", "-d",
                 "{extends: default, rules: {line-length: disable, document-start: disable, "
                 "indentation: {indent-sequences: whatever}}}", str(f)])
        assert r.returncode == 0, r.stdout


def test_schemas_are_vendored_not_fetched():
    for path in CRD_SCHEMAS.values():
        assert path.is_file() and path.stat().st_size > 1000, path
        assert path.is_relative_to(ROOT)
    assert (DEPLOY / "schemas/README.md").is_file()
    assert (DEPLOY / "schemas/LICENSE.datreeio-CRDs-catalog").is_file()
