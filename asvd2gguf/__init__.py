"""asvd2gguf: training-free low-rank compression (ASVD) of causal LMs, shipped as GGUF for llama.cpp."""

__version__ = "0.1.0"
