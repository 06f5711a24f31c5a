"""Every vLLM patch HybridKV needs, in one place. Each is guarded (applied once, only when its target has the
expected shape) and version-checked against the vLLM range this plugin was built and tested for.

1. ``CpuPlatform.get_attn_backend_cls`` (and ``CudaPlatform``'s on a CUDA build): vLLM's CPU platform ignores any
   backend name but its own, and a selected backend applies to every layer on CUDA; the wrap returns the HYBRIDKV
   backend when ``--attention-backend HYBRIDKV`` chose it for a decoder layer, and lets vLLM choose otherwise
   (encoder layers, the vision tower, every other backend name).
2. ``GPUModelRunner._build_attention_metadata`` (the V1 runner; the CPU runner inherits it): publishes each
   step's rows (request id, prompt length, image/video placeholder spans from ``mm_features``) before vLLM
   builds attention metadata, because metadata builders are never told which request a row belongs to, and
   once every KV-cache group's builder has added its tier, finishes the step plan (runtime.py) once.
   Model Runner V2 (CUDA's default in vLLM 0.32) is not wrapped: start-up refuses it, naming
   ``VLLM_USE_V2_MODEL_RUNNER=0`` (runtime.py).
3. ``GPUModelRunner._update_states``: releases the cold-tier entries of finished, aborted and preempted
   requests, and zeroes the blocks-held gauges once no request is left (see below).
4. Per-request settings (requests.py): ``InputProcessor._validate_params`` (API server and offline ``LLM``) refuses a
   bad ``hybridkv_budget`` with vLLM's validation error (HTTP 400); ``Scheduler.__init__`` builds the runtime in the
   scheduler's process and ``Scheduler.schedule`` marks whose requests are being scheduled;
   ``NewRequestData.from_request`` (a request's first schedule) decides the request's budget,
   opt-out and cold-tier admission once and hands the decision to the worker in the request's extra arguments;
   ``Scheduler._free_request`` releases it.
"""
from __future__ import annotations

import copy
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


def _wrap_backend_selection(platform_cls, backend_path: str, fallback) -> None:
    from vllm.v1.attention.backend import AttentionType

    original = platform_cls.get_attn_backend_cls.__func__

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        name = getattr(selected_backend, "name", None)
        attn_type = getattr(attn_selector_config, "attn_type", AttentionType.DECODER)
        if name == "HYBRIDKV" and not attn_selector_config.use_mla and attn_type == AttentionType.DECODER:
            return backend_path
        if name == "HYBRIDKV":       # not a plain decoder layer: the platform's own choice serves it
            selected_backend = fallback()
        return original(cls, selected_backend, attn_selector_config, num_heads)

    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def patch_backend_selection(backend_path: str) -> None:
    if "backend_selection" in _applied:
        return
    from vllm.platforms import current_platform
    from vllm.platforms.cpu import CpuPlatform

    def cpu_attn():
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        return AttentionBackendEnum.CPU_ATTN

    _wrap_backend_selection(CpuPlatform, backend_path, cpu_attn)
    if current_platform.is_cuda():          # its module needs vLLM's CUDA build
        from vllm.platforms.cuda import CudaPlatform
        _wrap_backend_selection(CudaPlatform, backend_path, lambda: None)     # None: vLLM picks by priority
    _applied.add("backend_selection")


def _rows_of(runner, num_reqs: int):
    from hybridkv_vllm.adapter.requests import RequestSetting
    from hybridkv_vllm.adapter.runtime import RowContext
    batch = runner.input_batch
    rows = []
    for i, req_id in enumerate(batch.req_ids[:num_reqs]):
        state = runner.requests.get(req_id)
        spans = []
        for feature in getattr(state, "mm_features", None) or []:
            pos = feature.mm_position
            spans.append((int(pos.offset), int(pos.offset) + int(pos.length)))
        params = getattr(state, "sampling_params", None)
        rows.append(RowContext(req_id=req_id, prompt_len=int(batch.num_prompt_tokens[i]), visual_spans=spans,
                               setting=RequestSetting.of(getattr(params, "extra_args", None))))
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


def patch_request_validation() -> None:
    """4a. A bad ``hybridkv_budget`` is refused where vLLM validates a request (HTTP 400 in the API server)."""
    if "request_validation" in _applied:
        return
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from hybridkv_vllm.adapter.requests import RESOLVED, XARG_BUDGET, RequestSettingError, validate_extra_args
    from hybridkv_vllm.adapter.runtime import uses_hybridkv

    original = InputProcessor._validate_params

    @functools.wraps(original)
    def _validate_params(self, params, *args, **kwargs):
        if isinstance(params, SamplingParams) and params.extra_args and uses_hybridkv(self.vllm_config):
            if RESOLVED in params.extra_args:
                raise VLLMValidationError(f"vllm_xargs.{RESOLVED} is set by the server, not by requests",
                                          parameter=f"vllm_xargs.{RESOLVED}")
            try:
                validate_extra_args(params.extra_args)
            except RequestSettingError as err:
                raise VLLMValidationError(str(err), parameter=f"vllm_xargs.{XARG_BUDGET}",
                                          value=params.extra_args.get(XARG_BUDGET)) from err
        return original(self, params, *args, **kwargs)

    InputProcessor._validate_params = _validate_params
    _applied.add("request_validation")


def patch_scheduler_admission() -> None:
    """4b. The scheduler decides each request's setting at its first schedule and forgets it when it finishes."""
    if "scheduler_admission" in _applied:
        return
    from vllm.v1.core.sched.output import NewRequestData
    from vllm.v1.core.sched.scheduler import Scheduler

    from hybridkv_vllm.adapter import runtime
    from hybridkv_vllm.adapter.requests import RESOLVED

    init, schedule, free = Scheduler.__init__, Scheduler.schedule, Scheduler._free_request
    from_request = NewRequestData.from_request.__func__
    scheduling: list = [None]        # the admission of the scheduler inside schedule() (one engine thread)

    @functools.wraps(init)
    def __init__(self, vllm_config, *args, **kwargs):
        # the budget manager and the admission read the runtime in this process: build it (and check it) here
        self._hybridkv = runtime.get_runtime(vllm_config) if runtime.uses_hybridkv(vllm_config) else None
        init(self, vllm_config, *args, **kwargs)

    @functools.wraps(schedule)
    def _schedule(self, *args, **kwargs):
        scheduling[0] = getattr(self, "_hybridkv", None)
        try:
            return schedule(self, *args, **kwargs)
        finally:
            scheduling[0] = None

    @functools.wraps(from_request)
    def _from_request(cls, request, *args, **kwargs):
        state, params = scheduling[0], request.sampling_params
        if state is not None and params is not None:
            setting = state.admission.admit(request.request_id, request.num_prompt_tokens, params.extra_args)
            # the request's own copy (a shallow clone may share extra_args with other requests)
            params = copy.copy(params)
            params.extra_args = {**(params.extra_args or {}), RESOLVED: setting.as_extra_arg()}
            request.sampling_params = params
        return from_request(cls, request, *args, **kwargs)

    @functools.wraps(free)
    def _free_request(self, request, *args, **kwargs):
        result = free(self, request, *args, **kwargs)
        if getattr(self, "_hybridkv", None) is not None:
            self._hybridkv.admission.release(request.request_id)
        return result

    Scheduler.__init__ = __init__
    Scheduler.schedule = _schedule
    Scheduler._free_request = _free_request
    NewRequestData.from_request = classmethod(_from_request)
    _applied.add("scheduler_admission")


def apply_all(backend_path: str) -> None:
    _check_version()
    patch_backend_selection(backend_path)
    patch_v1_runner_batch_context()
    patch_v1_runner_request_release()
    patch_request_validation()
    patch_scheduler_admission()
