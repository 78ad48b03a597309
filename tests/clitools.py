"""Run the real CLI entry point in-process (one-line errors and exit codes included)."""

from __future__ import annotations

import sys

import pytest


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from asvd2gguf.cli import main

    old = sys.argv
    sys.argv = ["asvd2gguf", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def torch_llama_compat_ppl(model, text, ctx: int, chunks: int, capsys: pytest.CaptureFixture) -> float:
    """`asvd2gguf ppl MODEL --llama-compat` (torch, scored as llama-perplexity scores): its PPL."""
    code, out, err = run_cli(["ppl", model, "--text", text, "--ctx", str(ctx), "--chunks", str(chunks),
                              "--llama-compat"], capsys)
    assert code == 0, err
    return float(out.strip().splitlines()[-1].split("=")[1])
