"""Wall time and peak RSS of `asvd2gguf convert smollm2 --ratio 0.872 --kv 0.5`, cold and warm.

Cold: an empty cache directory (model dequantization, calibration, Fisher pass, factorizations
all run). Warm: the same command again with another --ratio, reusing the cache. Calibration:
wiki.valid.tokens, 8 x 256 tokens, seed 233 (the acceptance protocol).

    python bench/convert_time.py [--keep-cache DIR]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2"


def run(cache: Path, out: Path, ratio: str) -> tuple[float, int, str]:
    cmd = [sys.executable, "-m", "asvd2gguf.cli", "convert", "smollm2", "--ratio", ratio, "--kv", "0.5",
           "--calib", str(WIKI / "wiki.valid.tokens"), "--calib-samples", "8", "--calib-seqlen", "256",
           "--seed", "233", "--out", str(out), "--force", "--cache-dir", str(cache)]
    t = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.time() - t
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over children so far
    if res.returncode != 0:
        sys.exit(f"convert failed: {res.stderr.strip()}")
    return secs, rss, res.stderr.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep-cache", type=Path, default=None, help="use (and keep) this cache folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.keep_cache or Path(tmp) / "cache"
        out = Path(tmp) / "o.gguf"
        cold = run(cache, out, "0.872")
        warm = run(cache, out, "0.81")
    print("| run | wall s | peak RSS MiB (max so far) | summary |")
    print("|---|---|---|---|")
    print(f"| cold, --ratio 0.872 --kv 0.5 | {cold[0]:.1f} | {cold[1] / 1024:.0f} | {cold[2]} |")
    print(f"| warm, --ratio 0.81 --kv 0.5 | {warm[0]:.1f} | {warm[1] / 1024:.0f} | {warm[2]} |")


if __name__ == "__main__":
    main()
