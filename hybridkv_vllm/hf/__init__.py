"""HF transformers integration: the ``"hybridkv"`` attention function and per-generation HybridKV state.

Usage (batch 1)::

    from hybridkv_vllm.core import BudgetConfig, HeadProfile, make_policy
    from hybridkv_vllm.hf import HybridKVState, activate, encode_chat, load_model

    lm = load_model("models/smollm2-vl")                      # attn_implementation="hybridkv"
    prompt = encode_chat(lm, "Describe the image.", [image])
    policy = make_policy("hybridkv", HeadProfile.load("configs/profiles/smollm2-vl.json"), BudgetConfig(0.1))
    with activate(HybridKVState(policy, prompt.visual_mask, lm.text_config.num_hidden_layers)):
        out = lm.model.generate(**prompt.inputs, max_new_tokens=64, do_sample=False)
"""
from hybridkv_vllm.hf.attention import ATTN_IMPLEMENTATION, HFIntegrationError, activate, register
from hybridkv_vllm.hf.generate import Decoded, Session, generate
from hybridkv_vllm.hf.inputs import EncodedPrompt, LoadedModel, encode_chat, load_model
from hybridkv_vllm.hf.state import HFLayerCache, HybridKVState

__all__ = ["ATTN_IMPLEMENTATION", "Decoded", "EncodedPrompt", "HFIntegrationError", "HFLayerCache", "HybridKVState",
           "LoadedModel", "Session", "activate", "encode_chat", "generate", "load_model", "register"]
