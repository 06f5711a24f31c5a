"""Every vLLM symbol the plugin touches, and a check of a vLLM source tree against them.

The list is the contract between the plugin and vLLM: modules, classes, functions, methods with the parameters the
plugin passes or receives, fields it reads, enum members it names. :func:`check_tree` reads a tree of vLLM's
Python sources (the installed package, or the ``.py`` files unzipped from another release's wheel) with ``ast``:
nothing is imported, so any release can be checked on any machine. ``tests/adapter/test_vllm_surface.py`` checks
the installed vLLM; ``scripts/check_vllm_surface.py`` writes the report for other releases
(``docs/vllm_surface.md``).

A module written ``a|b`` names alternatives (the plugin takes the first that has the symbol).
``required=False`` marks a symbol the plugin uses only where it exists (Model Runner V1, deleted in vLLM 0.34).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Symbol:
    module: str                     # dotted module path
    name: str                       # top-level name, or Class.member
    params: tuple[str, ...] = ()    # parameter names the plugin relies on (functions and methods)
    fields: tuple[str, ...] = ()    # attributes read off instances (class-level annotations or assignments)
    required: bool = True
    why: str = ""

    @property
    def where(self) -> str:
        return f"{self.module}.{self.name}"


V1 = "vllm.v1.worker.gpu_model_runner"
V2 = "vllm.v1.worker.gpu.model_runner"

SURFACE: tuple[Symbol, ...] = (
    # registration (plugin.py, kv_spec.py)
    Symbol("vllm.v1.attention.backends.registry", "register_backend", why="the HYBRIDKV backend name"),
    Symbol("vllm.v1.attention.backends.registry", "AttentionBackendEnum", fields=("CPU_ATTN",)),
    Symbol("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry.register",
           ("kvcache_spec_cls", "manager_class", "uniform_type_base_spec"), why="the budget spec and its manager"),
    Symbol("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry._ensure_registered",
           why="built-ins first (the registry's lazy init)"),
    Symbol("vllm.v1.kv_cache_interface", "AttentionSpec",
           fields=("block_size", "num_kv_heads", "head_size", "dtype", "page_size_bytes")),
    Symbol("vllm.v1.kv_cache_interface", "KVCacheSpec"),
    Symbol("vllm.v1.kv_cache_interface", "KVCacheLayout", fields=("LBHNC",)),
    Symbol("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager.remove_skipped_blocks",
           ("request_id", "processed_computed_tokens", "num_prompt_tokens"), why="frees the pruned prompt gap"),
    Symbol("vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager._remove_blocks_in_range"),
    # the attention backend (backend.py)
    Symbol("vllm.v1.attention.backend", "AttentionBackend"),
    Symbol("vllm.v1.attention.backend", "AttentionImpl"),
    Symbol("vllm.v1.attention.backend", "AttentionMetadataBuilder.__init__",
           ("kv_cache_spec", "layer_names", "vllm_config", "device")),
    Symbol("vllm.v1.attention.backend", "AttentionMetadataBuilder.build",
           ("common_prefix_len", "common_attn_metadata", "fast_build")),
    Symbol("vllm.v1.attention.backend", "AttentionCGSupport", fields=("NEVER",)),
    Symbol("vllm.v1.attention.backend", "AttentionType", fields=("DECODER",)),
    Symbol("vllm.v1.attention.backend", "MultipleOf"),
    Symbol("vllm.v1.attention.backend", "CommonAttentionMetadata",
           fields=("query_start_loc_cpu", "seq_lens", "seq_lens_cpu_upper_bound", "num_reqs", "num_actual_tokens",
                   "block_table_tensor", "slot_mapping")),
    Symbol("vllm.model_executor.layers.attention_layer_base", "AttentionLayerBase"),
    Symbol("vllm.model_executor.models.utils", "extract_layer_index"),
    Symbol("vllm.forward_context", "get_forward_context"),
    Symbol("vllm.config", "VllmConfig"),
    Symbol("vllm.config", "get_current_vllm_config"),
    Symbol("vllm.utils.math_utils", "cdiv"),
    Symbol("vllm.v1.attention.backends.cpu_attn", "_get_attn_isa", why="vLLM's CPU kernels' key layout"),
    Symbol("vllm._cpu_ops|vllm._custom_ops", "cpu_attn_reshape_and_cache",
           ("k_scale", "v_scale", "kv_cache_dtype"), why="vLLM 0.34 moved vLLM's CPU kernels to _cpu_ops"),
    Symbol("vllm._cpu_ops|vllm._custom_ops", "cpu_attn_get_scheduler_metadata",
           ("num_reqs", "num_heads", "num_kv_heads", "head_dim", "seq_lens", "dtype", "query_start_loc", "causal",
            "sliding_window_size", "isa", "enable_kv_split", "dynamic_causal", "kv_cache_dtype")),
    Symbol("vllm._cpu_ops|vllm._custom_ops", "cpu_attention_with_kv_cache",
           ("query", "key_cache", "value_cache", "output", "query_start_loc", "seq_lens", "scale", "causal",
            "alibi_slopes", "sliding_window", "block_table", "softcap", "scheduler_metadata", "s_aux",
            "dynamic_causal", "k_scale", "v_scale", "kv_cache_dtype")),
    Symbol("vllm.envs", "VLLM_CPU_ATTN_SPLIT_KV"),
    Symbol("vllm.v1.attention.ops.triton_unified_attention", "unified_attention",
           ("q", "k", "v", "out", "cu_seqlens_q", "max_seqlen_q", "seqused_k", "max_seqlen_k", "softmax_scale",
            "causal", "window_size", "block_table", "softcap", "q_descale", "k_descale", "v_descale")),
    Symbol("vllm.triton_utils", "HAS_TRITON"),
    # backend selection (patches.py 1)
    Symbol("vllm.platforms.cpu", "CpuPlatform.get_attn_backend_cls",
           ("selected_backend", "attn_selector_config", "num_heads")),
    Symbol("vllm.platforms.cuda", "CudaPlatform.get_attn_backend_cls",
           ("selected_backend", "attn_selector_config", "num_heads")),
    Symbol("vllm.platforms", "current_platform"),
    # the model runners (patches.py 2)
    Symbol(V2, "GPUModelRunner.add_requests", ("scheduler_output",)),
    Symbol(V2, "GPUModelRunner.finish_requests", ("scheduler_output",)),
    Symbol(V2, "GPUModelRunner.prepare_attn", ("input_batch",)),
    Symbol(V2, "GPUModelRunner.prepare_dummy_attn", ("input_batch",)),
    Symbol("vllm.v1.worker.gpu.input_batch", "InputBatch", fields=("req_ids", "num_reqs")),
    Symbol("vllm.v1.worker.gpu.states", "RequestState", fields=("req_id_to_index",)),
    Symbol(V1, "GPUModelRunner._update_states", ("scheduler_output",), required=False,
           why="Model Runner V1 (deleted in vLLM 0.34)"),
    Symbol(V1, "GPUModelRunner._build_attention_metadata", ("num_tokens", "num_reqs"), required=False,
           why="Model Runner V1 (deleted in vLLM 0.34)"),
    Symbol("vllm.v1.core.sched.output", "SchedulerOutput",
           fields=("scheduled_new_reqs", "scheduled_cached_reqs", "finished_req_ids", "preempted_req_ids")),
    Symbol("vllm.v1.core.sched.output", "NewRequestData",
           fields=("req_id", "mm_features", "sampling_params", "prompt_len")),
    Symbol("vllm.v1.core.sched.output", "NewRequestData.from_request", ("request",)),
    Symbol("vllm.v1.core.sched.output", "CachedRequestData", fields=("resumed_req_ids",), required=False,
           why="read by the Model Runner V1 hook only"),
    # per-request settings (patches.py 4)
    Symbol("vllm.v1.engine.input_processor", "InputProcessor._validate_params", ("params",)),
    Symbol("vllm.v1.core.sched.scheduler", "Scheduler.__init__", ("vllm_config",)),
    Symbol("vllm.v1.core.sched.scheduler", "Scheduler.schedule"),
    Symbol("vllm.v1.core.sched.scheduler", "Scheduler._free_request", ("request",)),
    Symbol("vllm.exceptions", "VLLMValidationError"),
    Symbol("vllm.sampling_params", "SamplingParams", fields=("extra_args",)),
    # start-up and metrics (runtime.py, plugin.py)
    Symbol("vllm.transformers_utils.config", "get_config",
           ("model", "trust_remote_code", "revision")),
    Symbol("vllm.distributed", "get_tensor_model_parallel_rank"),
    Symbol("vllm.distributed.parallel_state", "model_parallel_is_initialized",
           why="the engine core's scheduler has no TP group"),
    Symbol("vllm.v1.metrics.prometheus", "setup_multiprocess_prometheus"),
)


@dataclass
class Finding:
    symbol: Symbol
    problem: str                    # "" when the symbol is there as the plugin uses it


@dataclass
class _Tree:
    root: Path                      # the directory holding the ``vllm`` package
    _cache: dict = field(default_factory=dict)

    def module(self, dotted: str) -> ast.Module | None:
        if dotted not in self._cache:
            base = self.root.joinpath(*dotted.split("."))
            path = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
            self._cache[dotted] = ast.parse(path.read_text(encoding="utf-8")) if path else None
        return self._cache[dotted]

    def lookup(self, dotted: str, name: str, depth: int = 0):
        """The definition of top-level ``name`` in module ``dotted``, following re-exports (``from x import name``
        and lazy ``__getattr__`` maps are not followed beyond plain imports)."""
        tree = self.module(dotted)
        if tree is None or depth > 6:
            return None
        for node in tree.body:
            found = _defines(node, name)
            if isinstance(found, ast.Assign):             # an alias: ``CudaPlatform = A if x else B``
                value = found.value.body if isinstance(found.value, ast.IfExp) else found.value
                if isinstance(value, ast.Name) and value.id != name:
                    return self.lookup(dotted, value.id, depth + 1) or found
            if found is not None:
                return found
        stars = []
        for node in ast.walk(tree):                      # re-exports, also inside ``if TYPE_CHECKING`` / try
            if isinstance(node, ast.ImportFrom):
                source = _absolute(dotted, node, self.is_package(dotted))
                for alias in node.names:
                    if alias.name == "*":
                        stars.append(source)
                    elif (alias.asname or alias.name) == name:
                        return self.lookup(source, alias.name, depth + 1) or (
                            self.module(f"{source}.{alias.name}") and ast.Module(body=[], type_ignores=[]))
        for source in stars:
            found = self.lookup(source, name, depth + 1)
            if found is not None:
                return found
        return None

    def is_package(self, dotted: str) -> bool:
        return self.root.joinpath(*dotted.split("."), "__init__.py").is_file()


def _absolute(current: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ``import from`` names (relative imports resolved against ``current``)."""
    if not node.level:
        return node.module or ""
    parts = current.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    return ".".join(parts[:keep] + ([node.module] if node.module else []))


def _defines(node: ast.stmt, name: str):
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
        return node
    if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
        return node
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
        return node
    if isinstance(node, ast.If):                          # e.g. ``if HAS_TRITON: ... else: ...``
        for child in node.body + node.orelse:
            found = _defines(child, name)
            if found is not None:
                return found
    if isinstance(node, ast.Try):
        for child in node.body + [s for h in node.handlers for s in h.body] + node.orelse:
            found = _defines(child, name)
            if found is not None:
                return found
    return None


def _members(cls: ast.ClassDef) -> dict[str, ast.AST]:
    out: dict[str, ast.AST] = {}
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.setdefault(node.name, node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.setdefault(node.target.id, node)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out.setdefault(target.id, node)
    for node in ast.walk(cls):                           # attributes set in methods: self.x = ...
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                        and target.value.id == "self"):
                    out.setdefault(target.attr, node)
    return out


def _class_members(tree: _Tree, module: str, cls: ast.ClassDef, depth: int = 0) -> dict[str, ast.AST]:
    """Members of ``cls`` and of its bases defined in the same tree (by name, through the module's imports)."""
    members = _members(cls)
    if depth > 6:
        return members
    for base in cls.bases:
        name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
        if isinstance(base, ast.Subscript):                # Generic[...] style bases
            inner = base.value
            name = inner.id if isinstance(inner, ast.Name) else None
        if not name:
            continue
        found = tree.lookup(module, name)
        if isinstance(found, ast.ClassDef):
            source = _module_of(tree, module, name) or module
            for key, value in _class_members(tree, source, found, depth + 1).items():
                members.setdefault(key, value)
    return members


def _module_of(tree: _Tree, module: str, name: str) -> str | None:
    """The module a name imported into ``module`` comes from (one hop)."""
    parsed = tree.module(module)
    if parsed is None:
        return None
    for node in ast.walk(parsed):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _absolute(module, node, tree.is_package(module))
    return None


def _params(fn: ast.AST) -> set[str] | None:
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    a = fn.args
    names = {p.arg for p in a.posonlyargs + a.args + a.kwonlyargs}
    if a.vararg or a.kwarg:
        names.add("*")                                    # takes anything further
    return names


def check_symbol(tree: _Tree, symbol: Symbol) -> Finding:
    if "|" in symbol.module:                  # alternatives, newest first: the first that defines the name
        options = symbol.module.split("|")
        for module in options:
            finding = check_symbol(tree, Symbol(module, symbol.name, symbol.params, symbol.fields))
            if not finding.problem:
                return Finding(symbol, "")
        return Finding(symbol, f"{symbol.name} is in none of {options}")
    if tree.module(symbol.module) is None:
        return Finding(symbol, f"module {symbol.module} is missing")
    head, _, member = symbol.name.partition(".")
    node = tree.lookup(symbol.module, head)
    if node is None:
        return Finding(symbol, f"{head} is missing from {symbol.module}")
    target = node
    if member:
        if not isinstance(node, ast.ClassDef):
            return Finding(symbol, f"{head} is not a class")
        source = _module_of(tree, symbol.module, head) or symbol.module
        target = _class_members(tree, source, node).get(member)
        if target is None:
            return Finding(symbol, f"{head}.{member} is missing")
    if symbol.params:
        names = _params(target)
        if names is None:
            return Finding(symbol, f"{symbol.name} is no longer a function")
        missing = [p for p in symbol.params if p not in names]
        if missing and "*" not in names:
            return Finding(symbol, f"{symbol.name} lost parameters {missing}")
        if missing:
            return Finding(symbol, f"{symbol.name} takes **kwargs where {missing} were named (check by hand)")
    if symbol.fields and isinstance(target, ast.ClassDef):
        source = _module_of(tree, symbol.module, head) or symbol.module
        members = _class_members(tree, source, target)
        missing = [f for f in symbol.fields if f not in members]
        if missing:
            return Finding(symbol, f"{symbol.name} lost fields {missing}")
    return Finding(symbol, "")


def check_tree(root: Path) -> list[Finding]:
    """Every symbol of :data:`SURFACE` against the vLLM sources under ``root`` (the directory holding ``vllm/``)."""
    tree = _Tree(Path(root))
    if tree.module("vllm") is None:
        raise FileNotFoundError(f"no vllm package under {root}")
    return [check_symbol(tree, s) for s in SURFACE]


def problems(findings: list[Finding]) -> list[Finding]:
    """The findings that break the plugin (a missing optional symbol is not one)."""
    return [f for f in findings if f.problem and f.symbol.required]
