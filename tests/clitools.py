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
