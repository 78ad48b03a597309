"""llama.cpp's RPC backend with the patched build on both sides (docs/runtime.md, "Several machines").

Two ggml-rpc-server processes on 127.0.0.1 stand for two machines; the client offloads every
layer (-ngl 99), which llama.cpp splits over the two by their free memory, so each holds part of
the factored weights and of the latent KV cache, and the graph (with the latent attention ops)
runs remotely. The reference is the same tool in one process on the CPU.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from asvd2gguf import llamacpp
from asvd2gguf.llama_server import rpc_server

pytestmark = [pytest.mark.slow, pytest.mark.llama]


def _run(cmd: list, env: dict | None = None) -> str:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace", timeout=900,
                         env=dict(os.environ, **(env or {})))
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout + res.stderr


def test_perplexity_and_decoding_split_over_two_rpc_servers(smol_latent, text_small, tmp_path):
    """llama-perplexity over two RPC servers gives the one-process logits (KLD < 1e-4, same PPL to
    1e-4 relative), with the model and the latent cache split over both; greedy decoding
    (llama-completion, the fused latent attention op) gives the same text."""
    ppl_exe, comp = llamacpp.binary("llama-perplexity"), llamacpp.binary("llama-completion")
    base = tmp_path / "local.kld"
    args = ["-m", smol_latent, "-f", text_small, "-c", "512", "--chunks", "4", "-t", "2"]
    local = llamacpp.parse_perplexity(_run([ppl_exe, *args, "--kl-divergence-base", base]))
    gen = ["-m", smol_latent, "-p", "The history of the city begins", "-n", "32", "--temp", "0", "-no-cnv",
           "--ignore-eos", "-t", "2", "-fa", "on", "--no-warmup", "-c", "256"]
    text_local = subprocess.run([str(comp), *map(str, gen)], capture_output=True, text=True, timeout=600).stdout
    with rpc_server(log=tmp_path / "rpc0.log") as a, rpc_server(log=tmp_path / "rpc1.log") as b:
        rpc = ["--rpc", f"{a.url},{b.url}", "-ngl", "99"]
        out = _run([ppl_exe, *args, *rpc, "--kl-divergence-base", base, "--kl-divergence", "-lv", "4"])
        text_rpc = subprocess.run([str(comp), *map(str, gen), *rpc], capture_output=True, text=True,
                                  timeout=600).stdout
    res = llamacpp.parse_perplexity(out)
    assert res["kld"] < 1e-4 and abs(res["ppl"] / local["ppl"] - 1) < 1e-4, res
    # both servers hold weights and latent cache (the log names each buffer by its endpoint)
    for srv in (a, b):
        assert re.search(rf"RPC\d\[{re.escape(srv.url)}\] model buffer size =\s+[1-9]", out), srv.url
        assert re.search(rf"RPC\d\[{re.escape(srv.url)}\] KV buffer size =\s+[1-9]", out), srv.url
    assert "latent KV cache enabled" in out
    assert len(text_local) > 100 and text_rpc == text_local


def test_rpc_server_stops_with_its_block(tmp_path):
    """The helper's servers are gone when the block ends, also when it ends by an exception."""
    with pytest.raises(RuntimeError), rpc_server(log=tmp_path / "rpc.log") as srv:
        proc = srv.proc
        raise RuntimeError("test body failed")
    assert proc.poll() is not None
    assert Path(tmp_path / "rpc.log").is_file()
