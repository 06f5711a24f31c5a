"""Per-process HybridKV state: the validated configuration, the tier plan, the current step's plan, the cold tier.

Built once per vLLM process from the ``VllmConfig`` (first use by the attention impl), so every problem
with the profile, the budget or the flags stops the engine at start-up with a message naming it.

A step: the runner hooks (``patches.py``, Model Runner V1 and V2) record what each new request brings
(:meth:`HybridKVRuntime.track`: prompt length, image/video spans, the scheduler's decision) and publish the step's
rows in batch order (:meth:`HybridKVRuntime.publish`) before vLLM builds the attention metadata; each KV-cache
group's builder adds its tier's tables to the step's :class:`StepPlan` (:meth:`HybridKVRuntime.plan_for`,
:meth:`HybridKVRuntime.add_tier`), and the builder that adds the last tier finishes the plan
(:meth:`HybridKVRuntime.finish_step`): it stacks the tiers, admits completing prompts to the cold tier and plans
retrieval, once, and publishes the step's metrics. Nothing in the per-layer path plans.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch

from hybridkv_vllm.adapter import metrics
from hybridkv_vllm.adapter.accounting import StepAccounting
from hybridkv_vllm.adapter.cold_tier import ColdTier, ColdTierFull, page_bytes
from hybridkv_vllm.adapter.config import HybridKVConfig, parse_config
from hybridkv_vllm.adapter.device_sync import DeviceCounter
from hybridkv_vllm.adapter.kv_ops import LayerHeads, LayerStep, plan_layers
from hybridkv_vllm.adapter.requests import Admission, RequestSetting
from hybridkv_vllm.adapter.static_heads import ObservationStash
from hybridkv_vllm.core.budgets import BudgetPlan, allocate, fold_for_tp
from hybridkv_vllm.core.errors import ConfigError
from hybridkv_vllm.core.profile import HeadProfile, ModelIdentity
from hybridkv_vllm.core.selection import SelectionConfig
from hybridkv_vllm.core.step_plan import StepPlan, plan_rows
from hybridkv_vllm.core.tiers import RETRIEVE, TierBudgets, TierPlan, plan_tiers

logger = logging.getLogger("hybridkv")


@dataclass
class RowContext:
    """What the attention layers need to know about one request row of the step."""

    req_id: str
    prompt_len: int
    visual_spans: list[tuple[int, int]]     # [start, end) of placeholder (image/video) tokens in the prompt
    setting: RequestSetting = field(default_factory=RequestSetting)   # the scheduler's decision (requests.py)

    @classmethod
    def of_new_request(cls, data) -> RowContext:
        """From vLLM's ``NewRequestData`` (both runners receive it at a request's first schedule, and Model Runner
        V2 again when a preempted request resumes): the original prompt's length, placeholder spans, decision."""
        spans = []
        for feature in getattr(data, "mm_features", None) or []:
            pos = feature.mm_position
            spans.append((int(pos.offset), int(pos.offset) + int(pos.length)))
        params = getattr(data, "sampling_params", None)
        return cls(req_id=data.req_id, prompt_len=int(data.prompt_len), visual_spans=spans,
                   setting=RequestSetting.of(getattr(params, "extra_args", None)))

    def visual_mask(self, length: int) -> torch.Tensor:
        mask = torch.zeros(length, dtype=torch.bool)
        for start, end in self.visual_spans:
            mask[max(0, start):min(length, end)] = True
        return mask


@dataclass
class BatchContext:
    """Rows of the step being built, in the model runner's row order (published by patches.py)."""

    rows: list[RowContext] = field(default_factory=list)

    def prompt_len(self, row: int) -> int | None:
        return self.rows[row].prompt_len if row < len(self.rows) else None


@dataclass
class HybridKVRuntime:
    config: HybridKVConfig
    profile: HeadProfile
    budget_plan: BudgetPlan
    tiers: TierPlan
    selection: SelectionConfig
    block_size: int
    accounting: StepAccounting
    budgets: TierBudgets                   # a request's budget -> blocks kept per tier (scheduler and worker)
    admission: Admission                   # scheduler side: per-request decisions, cold-tier reservations
    kv_ops_kind: str = "cpu"
    kv_dtype: torch.dtype = torch.float32
    batch: BatchContext = field(default_factory=BatchContext)
    # observation-window queries of prompt chunks that ended before their prompt did (chunked prefill)
    obs_stash: ObservationStash = field(default_factory=ObservationStash)
    cold: ColdTier | None = None           # dynamic heads' prompt chunks (cold_tier.py)
    step: StepPlan | None = None
    _step_batch: object = None
    # worker side: what the runner was told of each request it holds (track / forget, runner hooks)
    requests: dict[str, RowContext] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # the model's dynamic heads, numbered layer by layer: their rows in the cold tier, and their tiers
        modes = self.tiers.modes
        self.cold_index = [[-1] * len(layer) for layer in modes]
        dynamic_tiers = []
        for layer, heads in enumerate(modes):
            for head, mode in enumerate(heads):
                if mode == RETRIEVE:
                    self.cold_index[layer][head] = len(dynamic_tiers)
                    dynamic_tiers.append(self.tiers.tier_of[layer][head])
        self.dynamic_tiers = torch.tensor(dynamic_tiers, dtype=torch.long)
        self.loads = DeviceCounter("cpu")                    # chunks swapped in, summed on the device
        self.layers: dict[int, LayerHeads] = {}              # bound layers (backend.py)
        self.bind_cold_tier(self.profile.model.head_dim, self.kv_dtype, "cpu")

    def bind_cold_tier(self, head_dim: int, dtype: torch.dtype, device) -> ColdTier:
        """The cold tier on the KV cache's device and dtype. Bound when the metadata builders are made (before any
        step admits a request); a tier that holds requests is never replaced: they would lose their prompts."""
        if self.cold is None or self.cold.dtype != dtype or self.cold.device != torch.device(device):
            if self.cold is not None and len(self.cold):
                raise RuntimeError(f"HybridKV: the cold tier holds {len(self.cold)} requests on "
                                   f"{self.cold.device}/{self.cold.dtype} and cannot move to {device}/{dtype}")
            max_bytes = None if self.config.cold_tier_gib is None else int(self.config.cold_tier_gib * 2**30)
            self.cold = ColdTier(self.block_size, head_dim, dtype, len(self.dynamic_tiers), max_bytes, device,
                                 pages_on_host=self.config.cold_tier_memory == "host",
                                 units=self.selection.sub_chunks)
            self.loads = DeviceCounter(device)
        return self.cold

    def track(self, new_requests) -> None:
        """The runner received these requests (``NewRequestData``): remember what their rows need."""
        for data in new_requests:
            self.requests[data.req_id] = RowContext.of_new_request(data)

    def forget(self, live: set[str]) -> None:
        """Keep the contexts of the requests the runner still holds (preempted ones included: they resume)."""
        for req_id in set(self.requests) - live:
            del self.requests[req_id]

    def publish(self, req_ids) -> None:
        """Start a step: its rows, in the runner's batch order (empty for warm-up and profiling batches); stashed
        queries of requests no longer scheduled are dropped."""
        rows = []
        for req_id in req_ids:
            context = self.requests.get(req_id)
            if context is None:          # every scheduled request passed a runner hook first (patches.py)
                raise RuntimeError(f"HybridKV: request {req_id} is scheduled but was never announced to the worker")
            rows.append(context)
        self.batch = BatchContext(rows)
        self.obs_stash.drop(live=set(req_ids))

    def plan_for(self, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_reqs: int,
                 num_tokens: int) -> StepPlan:
        """The step plan of the batch being built (made by the first KV-cache group's builder from host lists;
        ``seq_lens``: vLLM's host copy where it has one, else read to the host once per step)."""
        if self.step is None or self._step_batch is not self.batch:
            cfg, rows = self.config, self.batch.rows
            settings = [rows[r].setting if r < len(rows) else RequestSetting() for r in range(num_reqs)]
            plan_rows_ = plan_rows([rows[r].req_id if r < len(rows) else None for r in range(num_reqs)],
                                   [self.batch.prompt_len(r) for r in range(num_reqs)],
                                   query_start_loc.tolist()[:num_reqs + 1], seq_lens.tolist()[:num_reqs],
                                   self.block_size, cfg.floor_blocks, cfg.min_prompt_tokens,
                                   budgets=[s.budget for s in settings],
                                   bypass=[s.bypass is not None for s in settings])
            self.step = StepPlan(plan_rows_, num_tokens, query_start_loc[:num_reqs + 1], self.block_size)
            self._step_batch = self.batch
        return self.step

    def add_tier(self, plan: StepPlan, tier: int, tables) -> None:
        """A tier's builder adds its tables; the one that adds the last tier finishes the step's plan."""
        plan.add_group(tier, tables)
        if len(plan.groups) == len(self.tiers.tiers):
            self.finish_step(plan)

    def finish_step(self, plan: StepPlan) -> None:
        """Once per step, after every group was built: admit completing prompts to the cold tier, stack the
        tiers, plan retrieval, publish the step's figures."""
        if plan.finalized:
            return
        bs = self.block_size
        cold = self.cold
        for r, row in enumerate(plan.rows):
            if row.compressed and row.completes_prompt and row.req_id is not None:
                try:
                    cold.admit(row.req_id, row.prompt_len // bs, self.kept_of_tiers(plan, r)[self.dynamic_tiers])
                except ColdTierFull as err:
                    # cannot happen: the scheduler reserved this request's pages within the bound (requests.py);
                    # if it did, this request's dynamic heads would keep their first chunks only, the engine goes on
                    logger.error("HybridKV: request %s gets no cold-tier entry: %s", row.req_id, err)
        plan.finalize(len(self.tiers.tiers), cold.slot_of)
        if plan.decode is not None:
            sub = self.selection.sub_chunks                                        # retrieval units per chunk
            cold.ensure_hot_width(plan.decode.k_max * sub)
            dyn_k = plan.decode.k_host[self.dynamic_tiers]                           # [Hdyn, Rr]
            self.accounting.chunks_scored += int(((dyn_k > 0) * plan.decode.chunks_host).sum()) * sub
        cold.retired.collect()                          # replaced pinned pages the device is done with
        loads = self.loads.drain()                      # on CUDA: a step or more late, never waiting
        if loads:
            self.accounting.chunk_loads += loads
            self.accounting.swap_in_bytes += loads * cold.page_kv_bytes // cold.units     # loads count units
        self.accounting.observe(self.batch, plan.rows, cold.nbytes)

    def layer_step(self, plan: StepPlan, heads: LayerHeads) -> LayerStep:
        """The layer's share of the step plan: computed for every bound layer at once, on first use in a step."""
        steps = plan.cache.get("layers")
        if steps is None or steps.get(heads.index, (None,))[0] is not heads:   # a layer bound since (new cache)
            layers = [self.layers[i] for i in sorted(self.layers)]
            steps = {h.index: (h, step) for h, step in zip(layers, plan_layers(plan, layers, self.cold,
                                                                              self.selection))}
            plan.cache["layers"] = steps
        return steps[heads.index][1]

    @staticmethod
    def kept_of_tiers(plan: StepPlan, row: int) -> torch.Tensor:
        return torch.stack([plan.groups[t].kept[row] for t in range(len(plan.groups))])

    def held_request_ids(self) -> set[str]:
        """Requests the worker holds state for (cold-tier entries, stashed observation queries)."""
        return set(self.cold.entries) | self.obs_stash.request_ids()

    def release(self, req_ids: set[str]) -> None:
        """Drop what the worker holds for these requests (finished, aborted, or preempted to be recomputed)."""
        self.cold.drop(req_ids)
        self.obs_stash.drop(gone=set(req_ids))


_runtime: HybridKVRuntime | None = None
_runtime_key: str | None = None


def current_runtime() -> HybridKVRuntime | None:
    """The runtime built in this process, if any (runner hooks and the budget manager: no engine, no runtime)."""
    return _runtime


def resolve_kv_ops(config: HybridKVConfig) -> str:
    """``auto``: vLLM's CPU kernels on the CPU build, the project's Triton kernels on CUDA."""
    if config.kv_ops != "auto":
        return config.kv_ops
    from vllm.platforms import current_platform
    return "cpu" if current_platform.is_cpu() else "triton"


#: The KV block size must be a multiple of this (vLLM's CPU attention kernels; HybridKVBackend declares it).
BLOCK_MULTIPLE = 32


def _check_flags(vllm_config, kv_ops: str) -> None:
    from vllm.platforms import current_platform
    if current_platform.is_cuda():
        if kv_ops != "triton":
            raise ConfigError(f"hybridkv.kv_ops={kv_ops!r} runs vLLM's CPU kernels: on CUDA use 'triton' (or "
                              "'auto', the default)")
    elif not current_platform.is_cpu():
        raise ConfigError(f"HYBRIDKV runs on vLLM's CPU and CUDA platforms, not on {current_platform.device_name!r}: "
                          "serve with the default --attention-backend there")
    cache = vllm_config.cache_config
    if cache.enable_prefix_caching:
        raise ConfigError("HYBRIDKV does not support prefix caching yet (pruned prompt blocks cannot be shared): "
                          "start vLLM with --no-enable-prefix-caching")
    if str(cache.cache_dtype) not in ("auto", "bfloat16", "float16", "float32"):
        raise ConfigError(f"HYBRIDKV does not support --kv-cache-dtype {cache.cache_dtype}: use auto")
    scheduler = vllm_config.scheduler_config
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise ConfigError("HYBRIDKV does not support speculative decoding: drop --speculative-config")
    if getattr(scheduler, "disable_hybrid_kv_cache_manager", False):
        raise ConfigError("HYBRIDKV needs vLLM's hybrid KV-cache manager: drop --disable-hybrid-kv-cache-manager")
    # The block size is settled here, before any spec or budget is built from it: vLLM's CUDA platform only raises
    # it for the chosen backend after the model is loaded (update_block_size_for_backend), too late for the tiers.
    if cache.block_size is None or cache.block_size % BLOCK_MULTIPLE:
        raise ConfigError(f"HYBRIDKV needs a KV block size that is a multiple of {BLOCK_MULTIPLE} (found "
                          f"{cache.block_size}; vLLM 0.32's default on CUDA is 16): start vLLM with --block-size 32")
    # Configurations whose KV cache or step layout the plugin does not handle, refused by name rather than run wrong.
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        raise ConfigError("HYBRIDKV does not support KV connectors (disaggregated prefill, KV offloading): drop "
                          "--kv-transfer-config")
    parallel = getattr(vllm_config, "parallel_config", None)
    for name, flag in (("decode_context_parallel_size", "--decode-context-parallel-size"),
                       ("prefill_context_parallel_size", "--prefill-context-parallel-size")):
        if (getattr(parallel, name, 1) or 1) > 1:
            raise ConfigError(f"HYBRIDKV does not support context parallelism: drop {flag}")
    if getattr(parallel, "enable_dbo", False):
        raise ConfigError("HYBRIDKV does not support dual-batch overlap: drop --enable-dbo")


def _tp_rank_and_size(vllm_config) -> tuple[int | None, int]:
    """This process's tensor-parallel rank (None: a process of no TP group, the engine core's scheduler) and the
    TP size."""
    size = vllm_config.parallel_config.tensor_parallel_size
    if size == 1:
        return 0, 1
    from vllm.distributed import get_tensor_model_parallel_rank
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    return (get_tensor_model_parallel_rank() if model_parallel_is_initialized() else None), size


def _root_hf_config(model_config):
    """The model's own HF config. Multimodal models build their language model under a derived config whose
    ``hf_config`` is the text config (and whose architecture is the text model's), so read the root again."""
    from vllm.transformers_utils.config import get_config
    return get_config(model_config.hf_config_path or model_config.model, model_config.trust_remote_code,
                      revision=model_config.revision)


def _check_cold_tier(config: HybridKVConfig, vllm_config, dynamic_heads: int, head_dim: int,
                     dtype: torch.dtype) -> None:
    """The cold tier holds the complete prompt chunks of every running request's dynamic heads (one page per chunk
    and head: ``cold_tier.page_bytes``). Its worst case is logged; at run time the scheduler keeps it within
    ``cold_tier_gib`` (requests.py): requests past the bound are served uncompressed."""
    max_num_seqs = vllm_config.scheduler_config.max_num_seqs
    max_model_len = vllm_config.model_config.max_model_len
    bs = vllm_config.cache_config.block_size
    units = config.selection_config(bs).sub_chunks
    bound_gib = max_num_seqs * (max_model_len // bs) * dynamic_heads * page_bytes(bs, head_dim, dtype, units) / 2**30
    logger.info("HybridKV: the cold tier holds the prompts of %d dynamic heads outside the KV-cache pool: at most "
                "%.2f GiB of host memory (max_num_seqs %d x max_model_len %d)", dynamic_heads, bound_gib,
                max_num_seqs, max_model_len)
    if config.cold_tier_gib is not None and bound_gib > config.cold_tier_gib:
        logger.warning("HybridKV: hybridkv.cold_tier_gib=%g is below that worst case: when the cold tier is full, "
                       "new requests are served uncompressed (hybridkv:requests_bypassed_total"
                       "{reason=\"cold_tier_full\"})", config.cold_tier_gib)


def _check_kv_ops(kv_ops: str) -> None:
    if kv_ops != "triton":
        return
    import hybridkv_kernels
    from vllm.platforms import current_platform
    if not hybridkv_kernels.HAS_TRITON:
        raise ConfigError("hybridkv.kv_ops='triton' needs Triton, which is not installed: use kv_ops 'cpu'")
    if current_platform.is_cpu() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("hybridkv.kv_ops='triton' on vLLM's CPU build runs the Triton kernels on Triton's "
                          "interpreter, for tests: set TRITON_INTERPRET=1, or serve with kv_ops 'cpu'")


def build_runtime(vllm_config) -> HybridKVRuntime:
    config = parse_config(vllm_config.additional_config)
    kv_ops = resolve_kv_ops(config)
    _check_flags(vllm_config, kv_ops)
    _check_kv_ops(kv_ops)
    identity = ModelIdentity.from_hf_config(_root_hf_config(vllm_config.model_config))
    profile = HeadProfile.load(config.profile, expect=identity)
    rank, world = _tp_rank_and_size(vllm_config)
    if world > 1:
        profile.slice_for_tp(0, world)           # refuses a head count the TP size does not divide, by name
    block_size = vllm_config.cache_config.block_size
    try:
        config.selection_config(block_size)
    except ConfigError as exc:
        raise ConfigError(f"hybridkv: {exc} (--block-size {block_size})") from exc
    # every rank and the scheduler plan the same tiers over the TP head slots (budgets.fold_for_tp); the head types
    # are this rank's own
    budget_plan = fold_for_tp(allocate(profile, config.budget_config(block_size)), world, rank)
    tiers = plan_tiers(budget_plan, max_groups=config.max_groups)
    logger.info("HybridKV: profile %s, budget %.3f, r %.2f, %s", config.profile, config.budget, config.r,
                tiers.summary())
    dtype = vllm_config.model_config.dtype
    dtype_bytes = torch.empty(0, dtype=dtype).element_size()
    _check_cold_tier(config, vllm_config, int((~budget_plan.is_static).sum()), profile.model.head_dim, dtype)
    budgets = TierBudgets(profile, config.budget_config(block_size), tiers, config.min_prompt_tokens, world)
    accounting = StepAccounting(budgets=budgets,
                                block_bytes=tiers.group_size * block_size * 2 * profile.model.head_dim * dtype_bytes)
    served = vllm_config.model_config.served_model_name or vllm_config.model_config.model
    metrics.configure(model_name=str(served[0] if isinstance(served, (list, tuple)) else served))
    metrics.set_profile_info(profile.model.architecture, profile.schema_version, config.budget,
                             profile.model.fingerprint)
    max_bytes = None if config.cold_tier_gib is None else int(config.cold_tier_gib * 2**30)
    admission = Admission(budgets, page_bytes(block_size, profile.model.head_dim, dtype,
                                              config.selection_config(block_size).sub_chunks), max_bytes)
    return HybridKVRuntime(config=config, profile=profile, budget_plan=budget_plan, tiers=tiers,
                           selection=config.selection_config(block_size), block_size=block_size,
                           accounting=accounting, budgets=budgets, admission=admission, kv_ops_kind=kv_ops,
                           kv_dtype=dtype)


def _key(vllm_config) -> str:
    model = vllm_config.model_config
    return json.dumps([model.model, vllm_config.cache_config.block_size, vllm_config.additional_config,
                       vllm_config.parallel_config.tensor_parallel_size], sort_keys=True, default=str)


def uses_hybridkv(vllm_config) -> bool:
    """Whether this engine's attention backend is HYBRIDKV (``--attention-backend HYBRIDKV``)."""
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    return getattr(backend, "name", None) == "HYBRIDKV"


def get_runtime(vllm_config=None) -> HybridKVRuntime:
    """The runtime of the engine being built or run in this process (rebuilt when another engine starts)."""
    global _runtime, _runtime_key
    if vllm_config is None:
        from vllm.config import get_current_vllm_config
        vllm_config = get_current_vllm_config()
    key = _key(vllm_config)
    if _runtime is None or key != _runtime_key:
        _runtime, _runtime_key = build_runtime(vllm_config), key
    else:       # another engine with the same settings: its flags are checked again (they are not in the key)
        _check_flags(vllm_config, _runtime.kv_ops_kind)
    return _runtime
