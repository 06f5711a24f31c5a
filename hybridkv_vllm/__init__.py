"""hybridkv-vllm."""
__version__ = "0.1.0"

#: The vLLM releases this plugin runs on: setup.py's ``install_requires`` and the start-up check
#: (``adapter/patches.py``) both read it. 0.32 is run by the tests; 0.33 and 0.34 are checked against their
#: sources (``docs/vllm_surface.md``): no CPU wheel of them exists to run here.
VLLM_REQUIREMENT = "vllm>=0.32,<0.35"
