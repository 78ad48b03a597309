#!/usr/bin/env bash
# The main job on the embedded default, end to end: install, compress SmolLM2-135M-Instruct with
# --ratio 0.9 --kv 0.5, print the torch perplexity before and after (wiki.test.raw, first 40 x 512
# tokens), build the patched llama.cpp, and run the original and the compressed file in it side by
# side: a short greedy chat answer of each, llama-perplexity (20 x 512 tokens) and the KV cache MiB
# at n_ctx 8192.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WIKI=../shared/data/wikitext-2
OUT=${OUT:-smollm2-hybrid-r0.9-kv0.5.gguf}
ORIG=${ORIG:-smollm2-f16.gguf}
# the acceptance protocol's calibration size: fast on 2 cores. The calibration itself is the
# default for an instruct model: 3/4 conversations the model writes through its chat template,
# 1/4 wiki.valid.tokens (or self-sampled text without it); docs/chat.md
CALIB=(--calib-samples 8 --calib-seqlen 256)
stage() { echo; echo "== $1 ($(date +%H:%M:%S), ${SECONDS} s so far)"; }
stage "compressing SmolLM2-135M-Instruct: --ratio 0.9 --kv 0.5"
# the default method, hybrid (kfac for k/v, whitening elsewhere; docs/results.md); asvd is the paper's
asvd2gguf convert smollm2 --ratio 0.9 --kv 0.5 "${CALIB[@]}" --out "$OUT" --force
asvd2gguf inspect "$OUT" | tail -n 20
if [ -f "$WIKI/wiki.test.raw" ]; then
  stage "torch perplexity, wiki.test.raw, 40 x 512 tokens"
  echo "perplexity before (original, dequantized to float):"
  asvd2gguf ppl smollm2 --text "$WIKI/wiki.test.raw" --chunks 40 | tail -n 1
  echo "perplexity after ($OUT):"
  asvd2gguf ppl "$OUT" --text "$WIKI/wiki.test.raw" --chunks 40 | tail -n 1
fi
stage "building the patched llama.cpp: the first build takes about 10-15 minutes on 2 cores, later runs reuse it"
asvd2gguf build-llama
# the original as F16 (--ratio 1.0: nothing factored); the shipped Q4_1 file answers worse
asvd2gguf convert smollm2 --ratio 1.0 "${CALIB[@]}" --out "$ORIG" --force > /dev/null
stage "the original and the compressed file in llama.cpp"
TEXT=()
if [ -f "$WIKI/wiki.test.raw" ]; then TEXT=(--text "$WIKI/wiki.test.raw" --chunks 20); fi
python3 scripts/side_by_side.py "$ORIG" "$OUT" --question "What is the capital of France?" "${TEXT[@]}"
stage "done"
echo "result: $OUT"
