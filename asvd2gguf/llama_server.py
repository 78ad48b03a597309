"""Run the patched llama-server (or ggml-rpc-server) on 127.0.0.1 for as long as a `with` block.

Why here: the tests, bench/server_load.py and scripts/demo.sh all start servers on a free local
port, wait until they answer, and must stop them whatever happens (a failed assertion, a
timeout, Ctrl-C). One context manager does that; the server's log goes to a file that the
caller can read (e.g. for "slot context shift" lines or the KV cache size).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .llamacpp import binary

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Running:
    """A started server: its base URL (llama-server) or host:port (RPC), process and log file."""

    url: str
    port: int
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def kv_mib(self) -> float:
        """The KV cache size the server allocated (sum of llama_kv_cache 'size = X MiB' lines)."""
        sizes = re.findall(r"llama_kv_cache: size = \s*([0-9.]+) MiB", self.log_text())
        if not sizes:
            raise UserError(f"no KV cache size in the server log {self.log}")
        return sum(float(x) for x in sizes)


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex((HOST, port)) == 0


@contextlib.contextmanager
def _started(cmd: list[str], port: int, log: Path, env: dict | None, ready,
             start_timeout_s: float) -> Iterator[Running]:
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, **(env or {}))
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    url = f"http://{HOST}:{port}" if Path(cmd[0]).name == "llama-server" else f"{HOST}:{port}"
    run = Running(url=url, port=port, proc=proc, log=log)
    try:
        t0 = time.time()
        while not ready(run):
            if proc.poll() is not None:
                tail = " | ".join(run.log_text().strip().splitlines()[-3:])
                raise UserError(f"{Path(cmd[0]).name} exited with {proc.returncode} while starting: {tail[:400]}")
            if time.time() - t0 > start_timeout_s:
                raise UserError(f"{Path(cmd[0]).name} did not answer within {start_timeout_s:.0f} s (log: {log})")
            time.sleep(0.2)
        yield run
    finally:
        _stop(proc)


def llama_server(model: Path, args: Sequence[str] = (), log: Path | None = None, env: dict | None = None,
                 start_timeout_s: float = 120.0, bins: Path | None = None) -> AbstractContextManager[Running]:
    """Start llama-server on 127.0.0.1:<free port> with `model` and extra `args`; yields a Running
    once GET /health answers 200 (model loaded); stops it (SIGTERM, then SIGKILL after 10 s) when
    the block ends, also on an exception. `env` is added to the environment (e.g.
    {"ASVD_LATENT_KV": "0"}); `bins` picks a build's bin folder (default: the current build).
    Raises UserError when the server exits or does not answer within start_timeout_s seconds.
    """
    port = free_port()
    exe = Path(bins) / "llama-server" if bins else binary("llama-server")
    log = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-server-{port}.log"
    cmd = [str(exe), "-m", str(model), "--host", HOST, "--port", str(port), *map(str, args)]
    return _started(cmd, port, Path(log), env, lambda r: _ready(r.url), start_timeout_s)


def rpc_server(args: Sequence[str] = (), log: Path | None = None, env: dict | None = None,
               start_timeout_s: float = 60.0, bins: Path | None = None) -> AbstractContextManager[Running]:
    """Start ggml-rpc-server on 127.0.0.1:<free port> (CPU backend, `args` added, e.g. ["-t", "1"]);
    yields a Running whose url is "127.0.0.1:PORT" (the form --rpc takes) once the port accepts
    connections; stopped like llama_server()."""
    port = free_port()
    exe = Path(bins) / "ggml-rpc-server" if bins else binary("ggml-rpc-server")
    log = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"rpc-server-{port}.log"
    cmd = [str(exe), "-H", HOST, "-p", str(port), *map(str, args)]
    return _started(cmd, port, Path(log), env, lambda r: _listening(r.port), start_timeout_s)
