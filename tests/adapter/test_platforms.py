"""Start-up checks per platform, with vLLM's platform object stood in (no GPU here): CUDA runs the Triton KV ops
on either model runner and refuses what it cannot serve by name; other platforms are refused by name."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

import vllm.platforms
from hybridkv_vllm.adapter import runtime
from hybridkv_vllm.adapter.config import HybridKVConfig
from hybridkv_vllm.core.errors import ConfigError


def _platform(kind: str):
    return SimpleNamespace(is_cpu=lambda: kind == "cpu", is_cuda=lambda: kind == "cuda", device_name=kind)


def _vllm_config(v2: bool = False):
    return SimpleNamespace(use_v2_model_runner=v2, speculative_config=None, kv_transfer_config=None,
                           cache_config=SimpleNamespace(enable_prefix_caching=False, cache_dtype="auto", block_size=32),
                           scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=False),
                           parallel_config=SimpleNamespace(decode_context_parallel_size=1,
                                                           prefill_context_parallel_size=1, enable_dbo=False,
                                                           tensor_parallel_size=1))


@pytest.fixture
def platform(monkeypatch):
    def use(kind: str):
        monkeypatch.setattr(vllm.platforms, "current_platform", _platform(kind), raising=False)
    return use


@pytest.mark.parametrize("kind, expect", [("cpu", "cpu"), ("cuda", "triton")])
def test_auto_kv_ops_follow_the_platform(platform, kind, expect):
    platform(kind)
    assert runtime.resolve_kv_ops(HybridKVConfig(profile="p")) == expect
    assert runtime.resolve_kv_ops(HybridKVConfig(profile="p", kv_ops="triton")) == "triton"


@pytest.mark.parametrize("v2", [True, False])
def test_cuda_accepts_the_triton_path_on_either_runner(platform, v2):
    platform("cuda")
    runtime._check_flags(_vllm_config(v2), "triton")          # no refusal (Model Runner V2: CUDA's default)


@pytest.mark.parametrize("kind, kv_ops, v2, message", [
    ("cuda", "cpu", False, "hybridkv.kv_ops='cpu'"),
    ("rocm", "triton", False, "not on 'rocm'"),
])
def test_what_cannot_run_is_refused_by_name(platform, kind, kv_ops, v2, message):
    platform(kind)
    with pytest.raises(ConfigError, match=message):
        runtime._check_flags(_vllm_config(v2), kv_ops)


def test_backend_selection_serves_decoder_layers_and_defers_the_rest():
    """The selection wrap (used for CpuPlatform and CudaPlatform): HYBRIDKV for plain decoder layers; encoder
    layers (the vision tower) and MLA go to the platform's own choice; other names pass through untouched."""
    from vllm.v1.attention.backend import AttentionType

    from hybridkv_vllm.adapter.patches import _wrap_backend_selection

    calls = []

    class Platform:
        @classmethod
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            calls.append(selected_backend)
            return "platform's choice"

    _wrap_backend_selection(Platform, "ours", lambda: "fallback")
    hybrid, other = SimpleNamespace(name="HYBRIDKV"), SimpleNamespace(name="FLASH_ATTN")
    decoder = SimpleNamespace(use_mla=False, attn_type=AttentionType.DECODER)
    assert Platform.get_attn_backend_cls(hybrid, decoder) == "ours" and calls == []
    assert Platform.get_attn_backend_cls(hybrid, SimpleNamespace(use_mla=False, attn_type=AttentionType.ENCODER_ONLY)) \
        == "platform's choice" and calls[-1] == "fallback"
    assert Platform.get_attn_backend_cls(hybrid, SimpleNamespace(use_mla=True, attn_type=AttentionType.DECODER)) \
        == "platform's choice" and calls[-1] == "fallback"
    assert Platform.get_attn_backend_cls(other, decoder) == "platform's choice" and calls[-1] is other


def test_a_cached_runtime_does_not_skip_the_flag_checks(platform, monkeypatch):
    """A second engine with the same HybridKV settings reuses the process's runtime; its own flags (here prefix
    caching) are still refused at start-up."""
    platform("cpu")
    config = _vllm_config()
    config.model_config = SimpleNamespace(model="m")
    config.cache_config.block_size, config.additional_config = 32, {"hybridkv": {"profile": "p"}}
    monkeypatch.setattr(runtime, "_runtime", SimpleNamespace(kv_ops_kind="cpu"))
    monkeypatch.setattr(runtime, "_runtime_key", runtime._key(config))
    assert runtime.get_runtime(config) is runtime._runtime
    config.cache_config.enable_prefix_caching = True
    with pytest.raises(ConfigError, match="--no-enable-prefix-caching"):
        runtime.get_runtime(config)


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.cache_config, "block_size", 16), "--block-size 32"),          # vLLM 0.32's CUDA default
    (lambda c: setattr(c.cache_config, "block_size", 48), "--block-size 32"),
    (lambda c: setattr(c, "kv_transfer_config", SimpleNamespace(kv_connector="LMCacheConnectorV1")),
     "--kv-transfer-config"),
    (lambda c: setattr(c.parallel_config, "decode_context_parallel_size", 2), "--decode-context-parallel-size"),
    (lambda c: setattr(c.parallel_config, "prefill_context_parallel_size", 2), "--prefill-context-parallel-size"),
    (lambda c: setattr(c.parallel_config, "enable_dbo", True), "--enable-dbo"),
])
@pytest.mark.parametrize("kind, kv_ops", [("cpu", "cpu"), ("cuda", "triton")])
def test_configurations_the_plugin_does_not_handle_are_refused_by_name(platform, kind, kv_ops, change, message):
    platform(kind)
    config = _vllm_config()
    runtime._check_flags(config, kv_ops)                       # the defaults pass
    change(config)
    with pytest.raises(ConfigError, match=re.escape(message)):
        runtime._check_flags(config, kv_ops)


def test_block_sizes_that_serve_pass(platform):
    platform("cuda")
    for block_size in (32, 64, 128):                           # 64: vLLM 0.34's default
        config = _vllm_config()
        config.cache_config.block_size = block_size
        runtime._check_flags(config, "triton")


def test_metadata_builders_bind_the_cold_tier_to_their_device_before_any_step(monkeypatch):
    """The builders are made when vLLM sets up the KV cache, before the first step admits a prompt: each binds the
    cold tier to its device and dtype there (on CUDA the first layer's forward came too late: the prompts admitted
    in the first step were dropped with the CPU tier it replaced)."""
    import torch

    from hybridkv_vllm.adapter import backend
    from hybridkv_vllm.adapter.kv_spec import HybridKVBudgetSpec

    bound = []
    monkeypatch.setattr(backend, "get_runtime",
                        lambda config: SimpleNamespace(bind_cold_tier=lambda *a: bound.append(a)))
    spec = HybridKVBudgetSpec(block_size=32, num_kv_heads=1, head_size=64, dtype=torch.bfloat16, fraction=0.2,
                              floor_blocks=2, min_prompt_tokens=0, tier=0)
    backend.HybridKVMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], SimpleNamespace(), torch.device("meta"))
    assert bound == [(64, torch.bfloat16, torch.device("meta"))]


def test_a_cold_tier_holding_requests_is_never_replaced():
    import torch

    from hybridkv_vllm.adapter.cold_tier import ColdTier

    state = SimpleNamespace(cold=ColdTier(4, 8, torch.float32, 2), config=SimpleNamespace(cold_tier_gib=None,
                            cold_tier_memory="host"), selection=SimpleNamespace(sub_chunks=1), block_size=4,
                            dynamic_tiers=torch.zeros(2), loads=None)
    state.cold.admit("r1", 6, torch.tensor([2, 2]))
    bind = runtime.HybridKVRuntime.bind_cold_tier
    assert bind(state, 8, torch.float32, "cpu") is state.cold           # same place: the same tier
    with pytest.raises(RuntimeError, match="holds 1 requests"):
        bind(state, 8, torch.bfloat16, "cpu")
    assert state.cold.slot_of("r1") is not None
