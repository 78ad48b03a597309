"""The original model and its compressed file in the patched llama.cpp, side by side (scripts/demo.sh).

    python scripts/side_by_side.py ORIGINAL.gguf COMPRESSED.gguf [--text wiki.test.raw] [--chunks 20]

Prints: a short greedy chat answer of each to the same question (llama-cli, one turn, the file's
own chat template, temperature 0, --tokens tokens), then a table of file size, llama-perplexity
(-c 512 --chunks N -t 2, the project's protocol) and the KV cache MiB at n_ctx 8192 (llama.cpp's
own log). Builds the patched llama.cpp first if needed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asvd2gguf import llamacpp  # noqa: E402

QUESTION = "What is the capital of France, and what is it known for?"


def answer(model: Path, question: str, tokens: int, threads: int) -> str:
    """llama-cli's one-turn answer (greedy), read from its --output-file."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "answer.txt"
        cmd = [str(llamacpp.binary("llama-cli")), "-m", str(model), "-p", question, "-n", str(tokens), "--temp", "0",
               "-st", "-t", str(threads), "-c", "2048", "--no-warmup", "-o", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL,
                             timeout=900)
        if res.returncode != 0 or not out.is_file():
            tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"llama-cli failed on {model.name}: {tail}")
        return out.read_text().split("Assistant:\n", 1)[-1].strip()


def columns(left: tuple[str, str], right: tuple[str, str], width: int = 48) -> str:
    """Two titled, wrapped text columns."""
    cols = []
    for title, body in (left, right):
        lines = [title, "-" * min(width, len(title))]
        for para in body.splitlines() or [""]:
            lines += textwrap.wrap(para, width) or [""]
        cols.append(lines)
    n = max(map(len, cols))
    return "\n".join(f"{a:<{width}}   {b}" for a, b in zip(*(c + [""] * (n - len(c)) for c in cols)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("original", type=Path)
    ap.add_argument("compressed", type=Path)
    ap.add_argument("--text", type=Path, help="text for llama-perplexity (skipped when absent)")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--kv-ctx", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for f in (args.original, args.compressed):
        if not f.is_file():
            raise SystemExit(f"error: no such model file: {f}")
    models = {"original": args.original, "compressed": args.compressed}
    print(f"\nQuestion: {args.question}  (greedy, {args.tokens} tokens at most)\n")
    answers = {k: answer(m, args.question, args.tokens, args.threads) for k, m in models.items()}
    print(columns(*((f"{k}: {m.name}", answers[k]) for k, m in models.items())))
    rows = {k: {"MiB": m.stat().st_size / 2**20} for k, m in models.items()}
    for k, m in models.items():
        rows[k]["kv"] = llamacpp.kv_cache_mib(m, ctx=args.kv_ctx, threads=args.threads)
        if args.text and args.text.is_file():
            rows[k]["ppl"] = llamacpp.perplexity(m, args.text, ctx=512, chunks=args.chunks, threads=args.threads)["ppl"]

    def row(label: str, key: str, fmt: str) -> None:
        print(f"| {label} | " + " | ".join(format(rows[k][key], fmt) for k in models) + " |")

    print()
    print("| | " + " | ".join(models) + " |")
    print("|---|---|---|")
    row("file MiB", "MiB", ".1f")
    if all("ppl" in r for r in rows.values()):
        row(f"llama-perplexity, {args.text.name}, {args.chunks} x 512 tokens", "ppl", ".2f")
    row(f"KV cache MiB at n_ctx {args.kv_ctx}", "kv", ".1f")
    return 0


if __name__ == "__main__":
    sys.exit(main())
