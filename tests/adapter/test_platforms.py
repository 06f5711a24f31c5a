"""Start-up checks per platform, with vLLM's platform object stood in (no GPU here): CUDA runs the Triton KV ops
on either model runner and refuses what it cannot serve by name; other platforms are refused by name."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import vllm.platforms
from hybridkv_vllm.adapter import runtime
from hybridkv_vllm.adapter.config import HybridKVConfig
from hybridkv_vllm.core.errors import ConfigError


def _platform(kind: str):
    return SimpleNamespace(is_cpu=lambda: kind == "cpu", is_cuda=lambda: kind == "cuda", device_name=kind)


def _vllm_config(v2: bool = False):
    return SimpleNamespace(use_v2_model_runner=v2, speculative_config=None,
                           cache_config=SimpleNamespace(enable_prefix_caching=False, cache_dtype="auto"),
                           scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=False))


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
    config.parallel_config = SimpleNamespace(tensor_parallel_size=1)
    config.cache_config.block_size, config.additional_config = 32, {"hybridkv": {"profile": "p"}}
    monkeypatch.setattr(runtime, "_runtime", SimpleNamespace(kv_ops_kind="cpu"))
    monkeypatch.setattr(runtime, "_runtime_key", runtime._key(config))
    assert runtime.get_runtime(config) is runtime._runtime
    config.cache_config.enable_prefix_caching = True
    with pytest.raises(ConfigError, match="--no-enable-prefix-caching"):
        runtime.get_runtime(config)
