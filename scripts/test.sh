#!/usr/bin/env bash
# The test command (README): lint, then the whole suite (the llama.cpp build is cached after the first run).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check asvd2gguf tests bench scripts
python3 -m pytest -q -p no:cacheprovider "$@"
