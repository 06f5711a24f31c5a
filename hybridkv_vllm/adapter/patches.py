"""Every vLLM patch HybridKV needs, in one place. Each is guarded (applied once, only when its target has the
expected shape) and version-checked against the vLLM range this plugin was built and tested for.

1. ``CpuPlatform.get_attn_backend_cls`` (and ``CudaPlatform``'s on a CUDA build): vLLM's CPU platform ignores any
   backend name but its own, and a selected backend applies to every layer on CUDA; the wrap returns the HYBRIDKV
   backend when ``--attention-backend HYBRIDKV`` chose it for a decoder layer, and lets vLLM choose otherwise
   (encoder layers, the vision tower, every other backend name).
2. The model runner's per-step methods (Model Runner V2: ``add_requests``, ``finish_requests``, ``prepare_attn``,
   ``prepare_dummy_attn``; Model Runner V1 while vLLM has it: ``_update_states``, ``_build_attention_metadata``):
   track each request's prompt length, image/video placeholder spans (``mm_features``) and the scheduler's
   decision when the runner first receives it, publish each step's rows in batch order before vLLM builds the
   attention metadata (metadata builders are never told which request a row belongs to), and release the worker
   state of finished, aborted and preempted requests (the cold tier, stashed queries). The step plan itself is
   finished by the builder of the last tier (runtime.py), so the hooks carry no planning.
3. (merged into 2)
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

_applied: set[str] = set()


def vllm_version_supported(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed vLLM's) is in the range the package declares."""
    from packaging.requirements import Requirement

    from hybridkv_vllm import VLLM_REQUIREMENT
    if version is None:
        import vllm
        version = vllm.__version__
    return Requirement(VLLM_REQUIREMENT).specifier.contains(version, prereleases=True)


def _check_version() -> None:
    if not vllm_version_supported():
        import vllm

        from hybridkv_vllm import VLLM_REQUIREMENT
        raise RuntimeError(f"hybridkv-vllm runs on {VLLM_REQUIREMENT}; found vLLM {vllm.__version__}")


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


def _runner_v1():
    """Model Runner V1's class, where this vLLM still has it (0.34 deletes it)."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:
        return None
    return GPUModelRunner


def patch_v1_runner() -> None:
    """2-3 on Model Runner V1 (the CPU runner of vLLM 0.32 inherits it unless V2 is chosen).

    ``_update_states`` receives each step's scheduler output: the requests it announces for the first time are
    tracked, and the worker-side state (cold tier, stashed queries) of requests the runner no longer holds
    (finished, aborted) and of preempted ones is released (they recompute their prompt, offloaded again, when they
    resume); once the runner holds no request the blocks-held gauges are zeroed. ``_build_attention_metadata``
    publishes the step's rows in the input batch's order before vLLM builds any metadata (capture batches: none).
    """
    if "v1_runner" in _applied:
        return
    runner_cls = _runner_v1()
    if runner_cls is None:
        _applied.add("v1_runner")
        return
    update, build = runner_cls._update_states, runner_cls._build_attention_metadata

    @functools.wraps(update)
    def _update_states(self, scheduler_output, *args, **kwargs):
        state = runtime_state()
        if state is not None:
            state.track(scheduler_output.scheduled_new_reqs)
        result = update(self, scheduler_output, *args, **kwargs)
        if state is not None:
            preempted = getattr(scheduler_output, "preempted_req_ids", None) or set()
            resumed = getattr(scheduler_output.scheduled_cached_reqs, "resumed_req_ids", None) or set()
            state.release((state.held_request_ids() - set(self.requests)) | set(preempted) | set(resumed))
            state.forget(set(self.requests))
            if self.input_batch.num_reqs == 0:
                state.accounting.idle()
        return result

    @functools.wraps(build)
    def _build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
        state = runtime_state()
        if state is not None:
            state.publish([] if kwargs.get("for_cudagraph_capture") else self.input_batch.req_ids[:num_reqs])
        return build(self, num_tokens, num_reqs, *args, **kwargs)

    runner_cls._update_states = _update_states
    runner_cls._build_attention_metadata = _build_attention_metadata
    _applied.add("v1_runner")


def patch_v2_runner() -> None:
    """2-3 on Model Runner V2 (vLLM's CUDA default, the only runner of 0.34; the CPU build's with
    ``VLLM_USE_V2_MODEL_RUNNER=1``). Its public per-step methods are the seams:

    - ``finish_requests``: finished, aborted and preempted requests leave the runner (V2 removes preempted ones and
      receives them again as new requests when they resume): the worker-side state of every request the runner no
      longer holds is released;
    - ``add_requests``: the step's new requests (resumed ones included) are tracked;
    - ``prepare_attn`` / ``prepare_dummy_attn``: the step's rows are published in the input batch's order right
      before ``model_state.prepare_attn`` builds the metadata (dummy, profiling and capture batches: none).

    No public seam serves instead: attention backends and their builders are never told which request a row
    belongs to (V2 orders the rows itself, ``sort_batch_req_ids``). The KV-connector API (read, not prototyped)
    sees the scheduler output but not that order either, would need every operator to pass ``--kv-transfer-config``,
    and would take the engine's one connector slot away from real connectors (LMCache, disaggregated prefill)."""
    if "v2_runner" in _applied:
        return
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    finish, add = GPUModelRunner.finish_requests, GPUModelRunner.add_requests
    prepare, prepare_dummy = GPUModelRunner.prepare_attn, GPUModelRunner.prepare_dummy_attn

    @functools.wraps(finish)
    def finish_requests(self, scheduler_output, *args, **kwargs):
        result = finish(self, scheduler_output, *args, **kwargs)
        state = runtime_state()
        if state is not None:            # the runner's own request states are the truth once it dropped them
            live = set(self.req_states.req_id_to_index)
            state.release(state.held_request_ids() - live)
            state.forget(live)
        return result

    @functools.wraps(add)
    def add_requests(self, scheduler_output, *args, **kwargs):
        state = runtime_state()
        if state is not None:
            state.track(scheduler_output.scheduled_new_reqs)
        result = add(self, scheduler_output, *args, **kwargs)
        if state is not None and not self.req_states.req_id_to_index:
            state.accounting.idle()
        return result

    @functools.wraps(prepare)
    def prepare_attn(self, input_batch, *args, **kwargs):
        state = runtime_state()
        if state is not None:
            state.publish(input_batch.req_ids[:input_batch.num_reqs])
        return prepare(self, input_batch, *args, **kwargs)

    @functools.wraps(prepare_dummy)
    def prepare_dummy_attn(self, input_batch, *args, **kwargs):
        state = runtime_state()
        if state is not None:
            state.publish([])
        return prepare_dummy(self, input_batch, *args, **kwargs)

    GPUModelRunner.finish_requests = finish_requests
    GPUModelRunner.add_requests = add_requests
    GPUModelRunner.prepare_attn = prepare_attn
    GPUModelRunner.prepare_dummy_attn = prepare_dummy_attn
    _applied.add("v2_runner")


def runtime_state():
    from hybridkv_vllm.adapter.runtime import current_runtime
    return current_runtime()


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
    patch_v1_runner()
    patch_v2_runner()
    patch_request_validation()
    patch_scheduler_admission()
