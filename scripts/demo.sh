#!/usr/bin/env bash
# The main job on the embedded default: install, compress SmolLM2-135M-Instruct with --ratio 0.9
# --kv 0.5, print the torch perplexity before and after (wiki.test.raw, first 40 x 512 tokens),
# and one chat answer of the original and of the compressed file through the patched llama.cpp.
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
# the default method, hybrid (kfac for k/v, whitening elsewhere; docs/results.md); asvd is the paper's
asvd2gguf convert smollm2 --ratio 0.9 --kv 0.5 "${CALIB[@]}" --out "$OUT" --force
asvd2gguf inspect "$OUT" | tail -n 20
if [ -f "$WIKI/wiki.test.raw" ]; then
  echo "perplexity before (original, dequantized to float):"
  asvd2gguf ppl smollm2 --text "$WIKI/wiki.test.raw" --chunks 40 | tail -n 1
  echo "perplexity after ($OUT):"
  asvd2gguf ppl "$OUT" --text "$WIKI/wiki.test.raw" --chunks 40 | tail -n 1
fi
# one chat answer each, greedy, through llama.cpp's chat path (the GGUF's template) as users run
# it; the original as F16 (--ratio 1.0: nothing factored; the shipped Q4_1 file answers worse)
BIN=$(asvd2gguf build-llama | tail -n 1)   # cached; the first build takes ~12 minutes on 2 cores
asvd2gguf convert smollm2 --ratio 1.0 --method hybrid "${CALIB[@]}" --out "$ORIG" --force > /dev/null
Q="What is the capital of France?"
echo "user: $Q"
for f in "$ORIG" "$OUT"; do
  A=$("$BIN/llama-completion" -m "$f" -p "$Q" -cnv -st --jinja -n 48 --temp 0 -t 2 --no-warmup \
      --no-display-prompt --simple-io < /dev/null 2> /dev/null | sed 's/ *\[end of text\]//' | tr -s '\n' ' ')
  echo "$f: $A"
done
echo "result: $OUT"
