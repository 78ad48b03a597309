#!/usr/bin/env bash
# The main job on the embedded default: install, compress SmolLM2-135M with --ratio 0.9 --kv 0.5,
# and print the torch perplexity before and after (wiki.test.raw, first 40 x 512 tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WIKI=../shared/data/wikitext-2
OUT=${OUT:-smollm2-hybrid-r0.9-kv0.5.gguf}
CALIB=(--calib-samples 8 --calib-seqlen 256)   # the acceptance protocol's calibration: fast on 2 cores
if [ -f "$WIKI/wiki.valid.tokens" ]; then CALIB+=(--calib "$WIKI/wiki.valid.tokens"); else CALIB+=(--calib selfgen); fi
# the default method, hybrid (kfac for k/v, whitening elsewhere): 39.2 at this setting (docs/results.md);
# --method asvd is the paper's
asvd2gguf convert smollm2 --ratio 0.9 --kv 0.5 "${CALIB[@]}" --out "$OUT" --force
asvd2gguf inspect "$OUT" | tail -n 20
if [ -f "$WIKI/wiki.test.raw" ]; then
  echo "perplexity before (original, dequantized to float):"
  asvd2gguf ppl smollm2 --text "$WIKI/wiki.test.raw" --chunks 40 | tail -n 1
  echo "perplexity after ($OUT):"
  asvd2gguf ppl "$OUT" --text "$WIKI/wiki.test.raw" --chunks 40 | tail -n 1
fi
echo "result: $OUT"
