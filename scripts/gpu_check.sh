#!/usr/bin/env bash
# The GPU check (docs/runtime.md, "GPU check"): bench/gpu_check.py, from the repository root.
#
#   ASVD2GGUF_CACHE=$PWD/.gpu_cache bash scripts/gpu_check.sh            # on a CUDA host
#   bash scripts/gpu_check.sh --dry-run                                   # anywhere
#   bash scripts/gpu_check.sh --steps backend-ops,ppl                     # options: --help
#
# The device machine reaches no registry: what it lacks comes in .gpu_carry/ (made on the CPU
# machine by `python3 bench/gpu_check.py carry`). Here only the carried gguf wheel is installed,
# offline, into /tmp when the python3 there has no gguf module.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! python3 -c 'import gguf' 2>/dev/null; then
  wheels=(.gpu_carry/wheels/*.whl)
  if [ ! -e "${wheels[0]}" ]; then
    echo "error: python3 has no gguf module and .gpu_carry/wheels has no wheel (python3 bench/gpu_check.py carry)" >&2
    exit 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    "${wheels[@]}"
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
exec python3 bench/gpu_check.py "$@"
