"""Every vLLM patch HybridKV needs, in one place. Each is guarded (applied once, only when its target has the
expected shape) and version-checked against the vLLM range this plugin was built and tested for.

1. ``CpuPlatform.get_attn_backend_cls``: vLLM's CPU platform ignores any backend name but its own; the wrap
   returns the HYBRIDKV backend when ``--attention-backend HYBRIDKV`` chose it for a decoder layer, and defers
   to vLLM otherwise (encoder layers, the vision tower, every other backend name).
2. ``GPUModelRunner._build_attention_metadata`` (the V1 runner; the CPU runner inherits it): publishes each
   step's rows (request id, prompt length, image/video placeholder spans from ``mm_features``) before vLLM
   builds attention metadata, because metadata builders are never told which request a row belongs to, and
   once every KV-cache group's builder has added its tier, finishes the step plan (runtime.py) once.
   Model Runner V2 (CUDA with Triton) is not wrapped: this release refuses non-CPU platforms (runtime.py).
3. ``GPUModelRunner._update_states``: releases the cold-tier entries of finished, aborted and preempted
   requests, and zeroes the blocks-held gauges once no request is left (see below).
"""
from __future__ import annotations

import functools
import logging

logger = logging.getLogger("hybridkv")

SUPPORTED_VLLM = ((0, 32), (0, 33))        # [min, max) major.minor
_applied: set[str] = set()


def vllm_version_supported() -> bool:
    import vllm
    parts = tuple(int(p) for p in vllm.__version__.split("+")[0].split(".")[:2])
    return SUPPORTED_VLLM[0] <= parts < SUPPORTED_VLLM[1]


def _check_version() -> None:
    if not vllm_version_supported():
        import vllm
        raise RuntimeError(f"hybridkv-vllm supports vLLM {SUPPORTED_VLLM[0]}..{SUPPORTED_VLLM[1]} (exclusive); "
                           f"found {vllm.__version__}")


def patch_cpu_backend_selection(backend_path: str) -> None:
    if "cpu_selection" in _applied:
        return
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backend import AttentionType

    original = CpuPlatform.get_attn_backend_cls.__func__

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        name = getattr(selected_backend, "name", None)
        attn_type = getattr(attn_selector_config, "attn_type", AttentionType.DECODER)
        if name == "HYBRIDKV" and not attn_selector_config.use_mla and attn_type == AttentionType.DECODER:
            return backend_path
        if name == "HYBRIDKV":       # not a plain decoder layer: vLLM's own CPU backend serves it
            from vllm.v1.attention.backends.registry import AttentionBackendEnum
            selected_backend = AttentionBackendEnum.CPU_ATTN
        return original(cls, selected_backend, attn_selector_config, num_heads)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    _applied.add("cpu_selection")


def _rows_of(runner, num_reqs: int):
    from hybridkv_vllm.adapter.runtime import RowContext
    batch = runner.input_batch
    rows = []
    for i, req_id in enumerate(batch.req_ids[:num_reqs]):
        state = runner.requests.get(req_id)
        spans = []
        for feature in getattr(state, "mm_features", None) or []:
            pos = feature.mm_position
            spans.append((int(pos.offset), int(pos.offset) + int(pos.length)))
        rows.append(RowContext(req_id=req_id, prompt_len=int(batch.num_prompt_tokens[i]), visual_spans=spans))
    return rows


def patch_v1_runner_batch_context() -> None:
    if "v1_batch_context" in _applied:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._build_attention_metadata

    @functools.wraps(original)
    def _build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
        from hybridkv_vllm.adapter import runtime
        state = runtime._runtime
        if state is not None:          # a new object per step: the plan and the accounting run once per batch
            rows = [] if kwargs.get("for_cudagraph_capture") else _rows_of(self, num_reqs)
            state.publish(rows)
        result = original(self, num_tokens, num_reqs, *args, **kwargs)
        if state is not None:          # every group's builder added its tier: plan the step once
            state.finish_step()
        return result

    GPUModelRunner._build_attention_metadata = _build_attention_metadata
    _applied.add("v1_batch_context")


def patch_v1_runner_request_release() -> None:
    """3. ``GPUModelRunner._update_states``: releases the worker-side state (cold tier, stashed queries) of requests
    the runner no longer holds (finished, aborted) and of preempted requests (they recompute their prompt, which
    is offloaded again, when they resume), and once the runner holds no request zeroes the blocks-held gauges instead
    of keeping the last batch's."""
    if "v1_request_release" in _applied:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._update_states

    @functools.wraps(original)
    def _update_states(self, scheduler_output, *args, **kwargs):
        result = original(self, scheduler_output, *args, **kwargs)
        from hybridkv_vllm.adapter import runtime
        state = runtime._runtime
        if state is not None:
            # The runner's own request states are the truth: finished and aborted requests have left them
            # (entries of an earlier engine in this process too). Preempted requests lost their blocks and will
            # recompute (and offload again) their prompt when they resume.
            preempted = getattr(scheduler_output, "preempted_req_ids", None) or set()
            resumed = getattr(scheduler_output.scheduled_cached_reqs, "resumed_req_ids", None) or set()
            state.release((state.held_request_ids() - set(self.requests)) | set(preempted) | set(resumed))
            if self.input_batch.num_reqs == 0:
                state.accounting.idle()
        return result

    GPUModelRunner._update_states = _update_states
    _applied.add("v1_request_release")


def apply_all(backend_path: str) -> None:
    _check_version()
    patch_cpu_backend_selection(backend_path)
    patch_v1_runner_batch_context()
    patch_v1_runner_request_release()
