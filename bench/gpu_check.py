"""GPU check: every CUDA path of the project, verified in one prepared run on a CUDA host.

Issue 15; docs/runtime.md, section "GPU check". On a host with an NVIDIA GPU, from the
repository root (scripts/gpu_check.sh is the thin wrapper that also installs carried wheels):

    bash scripts/gpu_check.sh                       # every step; table and logs under $OUT
    bash scripts/gpu_check.sh --steps backend-ops,ppl --bins DIR
    bash scripts/gpu_check.sh --dry-run             # anywhere: plan, commands, every CPU step

and before, on the CPU machine, `python bench/gpu_check.py carry` writes .gpu_carry/ (what the
host lacks and cannot fetch: the llama.cpp tree, a SmolLM2 that fits the 64 MiB carry limit,
the WikiText files, the gguf wheel).

Steps, each with its budget (seconds, 16-core H200 host; see BUDGET_S). The build and the
convert lane (convert, then compare) run side by side; the GPU steps follow the build:

  env          nvidia-smi -> CMAKE_CUDA_ARCHITECTURES (host arch only), nvcc, torch; carried tree
  build        patched llama.cpp with CUDA: 4 targets, all cores (`asvd2gguf build-llama --cuda`)
  convert      CPU conversions (files for ppl/bench, CPU half of compare) || GPU conversions
  compare      convert --device cuda vs --device cpu: ranks, factors, quantized bytes
  backend-ops  test-backend-ops, CUDA vs CPU: LOWRANK_ATTN; MUL_MAT(_ID), GET_ROWS, CPY with NF4
  ppl          llama-perplexity -ngl 99 vs the CPU run of the same file: KLD (prefill, decode)
  bench        llama-bench pp512, tg128 at depth 0 and 4096, dense vs latent; KV MiB at 8192

--dry-run prints every command in plan order and runs each one that needs no GPU (the CPU
conversions, CPU reference perplexities, and, where a CPU build is cached, test-backend-ops
-b CPU and a small CPU llama-bench so that the parsers and the table see real output). It
never starts a llama.cpp build. Exit status: 0 when every check that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asvd2gguf import llamacpp  # noqa: E402
from asvd2gguf.errors import UserError  # noqa: E402
from asvd2gguf.llamacpp_tree import COMMIT, cache_root  # noqa: E402

STEPS = ("env", "build", "convert", "compare", "backend-ops", "ppl", "bench")
# Budgets (s) on a 16-core H200 host. Critical path: env + build + backend-ops + ppl + bench
# = 475 s of the 8 minutes; convert + compare (240 s) run beside the build. The build is the
# big one: the earlier H100 host built the CUDA tools for sm_90 in under 6 minutes.
BUDGET_S = {"env": 10, "build": 280, "convert": 200, "compare": 40, "backend-ops": 40, "ppl": 100, "bench": 45}
TIME_LIMIT_S = 480  # the whole run; commands are stopped so that the report is still written
REPORT_RESERVE_S = 10
GPU_TARGETS = ("llama-perplexity", "llama-completion", "llama-bench", "test-backend-ops")

CARRY = ROOT / ".gpu_carry"
CARRY_LAYERS = 16  # 16 of SmolLM2's 30 blocks (keep_layers): the carried file fits beside the tree
CARRY_LIMIT_MIB = 62.0  # the device tool carries 64 MiB with the working tree; keep a margin
TREE_EXCLUDE = ("models", "docs", "media", "tools/ui", "benches", "examples", "pocs", "app", ".github",
                *(f"ggml/src/ggml-{b}" for b in ("cann", "et", "hexagon", "hip", "metal", "musa", "opencl", "openvino",
                                                 "sycl", "virtgpu", "vulkan", "webgpu", "zdnn", "zendnn")))

# Limits. KLD: the bound for F16 weights and for F16 / q8_0 latents. NF4 gets 5e-3: the
# CPU quantizes activations to q8_0 for NF4 dot products, CUDA's batched path dequantizes NF4 to
# F16 for cuBLAS, so the two runs differ by more than rounding (the CPU's own batched vs
# one-token NF4 paths differ by 1.9e-4 on the tiny model, docs/runtime.md).
KLD_LIMIT = {"f16": 1e-3, "q8_0": 1e-3, "nf4": 5e-3}
# Factors: GPU and CPU statistics differ in float32 rounding, the float64 eigensolvers then
# differ in the last digits and F16 storage rounds at 5e-4; a wrong kernel gives O(1) errors.
# Each rank component's sign is free in an eigendecomposition, so factors are compared after
# aligning it (products need no alignment). Quantized factors: the sign choice changes the
# rounding (NF4's grid is not symmetric), so only the products are bounded, loosely.
FACTOR_TOL = 1e-2
PRODUCT_TOL = {"f16": 1e-2, "f32": 1e-2, "bf16": 1e-2, "q8_0": 5e-2, "nf4": 0.25, "iq4_nl": 0.25}

SMOL_VARIANTS = {  # file key -> convert options
    "dense": ["--ratio", "1.0"],
    "r0.9": ["--ratio", "0.9"],
    "kv0.5": ["--ratio", "0.9", "--kv", "0.5"],
    "kv0.5-q8_0": ["--ratio", "0.9", "--kv", "0.5", "--quant", "q8_0"],
    "kv0.5-nf4": ["--ratio", "0.9", "--kv", "0.5", "--quant", "nf4"],
}
GPU_SMOL = ("kv0.5", "kv0.5-q8_0", "kv0.5-nf4")  # converted on both devices and compared
TINY_ARCHS = ("llama", "qwen2")
TINY_OPTS = ["--ratio", "0.9", "--kv", "0.5"]
# tiny llama with a GPU + CPU device map, compared with its --device cuda file
TINY_MAP = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 0, "lm_head": 0,
            "model.layers.0": 0, "model.layers.1": "cpu"}

BACKEND_OPS = (  # label, test-backend-ops filter, whether CUDA must run some case
    ("LOWRANK_ATTN", ["-o", "LOWRANK_ATTN"], True),
    ("MUL_MAT nf4", ["-o", "MUL_MAT", "-p", "type_a=nf4"], True),
    ("MUL_MAT_ID nf4", ["-o", "MUL_MAT_ID", "-p", "type_a=nf4"], True),
    ("GET_ROWS nf4", ["-o", "GET_ROWS", "-p", "type=nf4"], True),
    # F32 -> NF4 has no CUDA kernel (the scheduler runs it on the CPU): none supported is fine
    ("CPY nf4", ["-o", "CPY", "-p", "nf4"], False),
)
PPL_ROWS = (  # label, file key, llama.cpp options, KLD limit key
    ("dense F16", "dense", [], "f16"),
    ("--ratio 0.9", "r0.9", [], "f16"),
    ("--kv 0.5, f16 latents", "kv0.5", [], "f16"),
    ("--kv 0.5, q8_0 latents", "kv0.5", ["-ctk", "q8_0", "-ctv", "q8_0"], "q8_0"),
    ("--kv 0.5, NF4 factors", "kv0.5-nf4", [], "nf4"),
)
LATENT_ENVS = ({}, {"ASVD_LATENT_FUSED": "0"}, {"ASVD_LATENT_V": "rebuild"})
DECODE_CHUNKS = 2  # the decode path (-ub 1) runs one token per graph: 2 chunks keep the CPU base short
BENCH_ROWS = (  # label, file key, environment
    ("dense F16", "dense", {}),
    ("--kv 0.5 latent", "kv0.5", {}),
    ("--kv 0.5 latent, unfused", "kv0.5", {"ASVD_LATENT_FUSED": "0"}),
)
BENCH_KEYS = ("pp512@d0", "tg128@d0", "pp512@d4096", "tg128@d4096")


# ---------------------------------------------------------------- parsing (no GPU, tested in CI)


def parse_gpus(text: str) -> list[dict]:
    """Rows of `nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total
    --format=csv,noheader`, e.g. "NVIDIA H200, 9.0, 580.159.03, 143771 MiB", as dicts; a bare
    compute_cap column ("9.0") also parses. Raises UserError when no row has a compute cap."""
    gpus = []
    for line in text.strip().splitlines():
        cols = [c.strip() for c in line.split(",")]
        cap = next((c for c in cols if re.fullmatch(r"\d+\.\d+", c)), None)
        if cap is None:
            continue
        i = cols.index(cap)
        gpus.append({"name": cols[0] if i > 0 else "", "compute_cap": cap,
                     "driver": cols[i + 1] if len(cols) > i + 1 else "",
                     "memory": cols[i + 2] if len(cols) > i + 2 else ""})
    if not gpus:
        raise UserError(f"no compute capability in nvidia-smi's output: {text.strip()[:120]!r}")
    return gpus


def cuda_archs(gpus: list[dict]) -> str:
    """CMAKE_CUDA_ARCHITECTURES (via CUDAARCHS) for exactly these GPUs: "9.0" -> "90-real".
    -real: machine code only, no PTX: this build runs on this host's GPUs and nowhere else,
    which is the point (half the device code, no JIT at start)."""
    caps = sorted({g["compute_cap"].replace(".", "") for g in gpus}, key=int)
    return ";".join(f"{c}-real" for c in caps)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse_backend_ops(out: str) -> dict[str, dict]:
    """Per backend tested by test-backend-ops' test mode: {"passed", "total", "not_supported",
    "status" ("OK"/"FAIL"/"?"), "failed": [case, ...]}. Skipped backends (the CPU without -b)
    do not appear."""
    out = _ANSI.sub("", out)
    res: dict[str, dict] = {}
    parts = re.split(r"^Backend \d+/\d+: (\S+)\s*$", out, flags=re.M)
    for name, body in zip(parts[1::2], parts[2::2]):
        if re.search(r"^\s+Skipping", body, flags=re.M):
            continue
        m = re.search(r"(\d+)/(\d+) tests passed", body)
        st = re.search(r"^\s+Backend \S+: (OK|FAIL)", body, flags=re.M)
        res[name] = {"passed": int(m.group(1)) if m else 0, "total": int(m.group(2)) if m else 0,
                     "not_supported": len(re.findall(r": not supported", body)),
                     "status": st.group(1) if st else "?",
                     "failed": re.findall(r"^\s+(\S+\(.*\)): .*FAIL\s*$", body, flags=re.M)}
    return res


def parse_bench(out: str) -> dict[str, float]:
    """llama-bench -o json -> {"pp512@d0": t/s, "tg128@d4096": t/s, ...}."""
    start = out.find("[")
    if start < 0:
        return {}
    try:
        rows, _ = json.JSONDecoder().raw_decode(out[start:])
    except json.JSONDecodeError:
        return {}
    res = {}
    for r in rows:
        key = f"{'pp' if r['n_prompt'] else 'tg'}{r['n_prompt'] or r['n_gen']}@d{r['n_depth']}"
        res[key] = round(float(r["avg_ts"]), 1)
    return res


def parse_kv_mib(out: str) -> float | None:
    sizes = [float(x) for x in re.findall(r"llama_kv_cache: size =\s*([\d.]+) MiB", out)]
    return sum(sizes) if sizes else None


def parse_convert(out: str) -> dict:
    """The converter's summary line: block-linear ratio, KV ratio, seconds; peak GPU MiB from `peak`."""
    res: dict = {}
    m = re.search(r"block-linear ratio ([\d.]+), KV ratio ([\d.]+), calibration\s+perplexity\s+"
                  r"([\d.]+)\s+->\s+([\d.]+),\s+([\d.]+) s", out)  # \s+: rich may wrap the line
    if m:
        res.update(ratio=float(m.group(1)), kv=float(m.group(2)), calib_ppl=float(m.group(4)),
                   pipeline_s=float(m.group(5)))
    m = re.search(r"gpu_check: peak GPU memory ([\d.]+) MiB", out)
    if m:
        res["peak_gpu_mib"] = float(m.group(1))
    return res


def last_error(out: str) -> str:
    lines = [ln.strip() for ln in _ANSI.sub("", out).splitlines() if ln.strip()]
    hit = next((ln for ln in reversed(lines) if re.search(r"error|failed|Traceback|FAIL", ln, re.I)), None)
    return (hit or (lines[-1] if lines else "no output"))[:200]


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "?"
    if x == 0:
        return "0"  # also -0.0, as llama-perplexity prints a KLD of -0.000000
    return f"{x:.{digits}g}" if abs(x) < 1e-2 and x != 0 else f"{x:.{digits + 1}g}"


def find_nvcc() -> str | None:
    return shutil.which("nvcc") or next((str(p) for p in sorted(Path("/usr/local").glob("cuda*/bin/nvcc"))), None)


def find_cublas(nvcc: str | None, roots: list[Path] | None, links: Path) -> tuple[str, dict[str, str]]:
    """Where the CUDA build gets cuBLAS: (description, environment to add). The toolkit's own
    headers when nvcc's toolkit has them (nothing to add); else an nvidia-cublas wheel (torch's
    on the GPU host: nvidia/cu*/{include,lib}), passed to cmake as CPATH and CMAKE_LIBRARY_PATH
    (with unversioned links in `links`, which find_library needs) and to the binaries as
    LD_LIBRARY_PATH. `roots`: folders holding the `nvidia` package (default: where it imports
    from). Checked here with the CUDA 13 wheel: cmake configures ggml-cuda with it."""
    if nvcc:
        tk = Path(nvcc).resolve().parent.parent
        for inc in (tk / "include", tk / "targets" / "x86_64-linux" / "include"):
            if (inc / "cublas_v2.h").is_file():
                return f"CUDA toolkit ({inc})", {}
    if roots is None:
        spec = importlib.util.find_spec("nvidia")
        roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for root in roots:
        for d in sorted(root.glob("cu*")):
            libs = {n: sorted((d / "lib").glob(f"lib{n}.so.*")) for n in ("cublas", "cublasLt")}
            if (d / "include" / "cublas_v2.h").is_file() and all(libs.values()):
                links.mkdir(parents=True, exist_ok=True)
                for n, found in libs.items():
                    link = links / f"lib{n}.so"
                    link.unlink(missing_ok=True)
                    link.symlink_to(found[0])
                join = lambda var, v: v + (os.pathsep + os.environ[var] if os.environ.get(var) else "")  # noqa: E731
                return f"nvidia-cublas wheel ({d})", {"CPATH": join("CPATH", str(d / "include")),
                                                      "CMAKE_LIBRARY_PATH": join("CMAKE_LIBRARY_PATH", str(links)),
                                                      "LD_LIBRARY_PATH": join("LD_LIBRARY_PATH", str(d / "lib"))}
    return "not found", {}


OVERLAY_HASH = "ASVD2GGUF_PATCH_HASH"


def patch_hash() -> str:
    """sha256 of patches/ and ggml_ops/: which patched tree an overlay was made from."""
    import hashlib

    h = hashlib.sha256()
    for folder in (ROOT / "patches", ROOT / "ggml_ops"):
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def make_overlay(patched: Path, pristine: Path, out: Path, digest: str) -> int:
    """Archive the files of the patched tree that differ from (or are missing in) the pristine
    one, with `digest` (patch_hash) beside them: the patch series without git. Returns the count."""
    import io

    skip = {x.split("/")[0] for x in TREE_EXCLUDE if "/" not in x}
    files = []
    for p in sorted(patched.rglob("*")):
        rel = p.relative_to(patched)
        if not p.is_file() or p.is_symlink() or rel.parts[0] in skip or rel.name == llamacpp.PATCHED_STAMP:
            continue
        q = pristine / rel
        if not q.is_file() or q.read_bytes() != p.read_bytes():
            files.append(rel)
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w:xz") as tf:
        for rel in files:
            tf.add(patched / rel, arcname=str(rel))
        info = tarfile.TarInfo(OVERLAY_HASH)
        info.size = len(digest)
        tf.addfile(info, io.BytesIO(digest.encode()))
    os.replace(tmp, out)
    return len(files)


def apply_overlay(overlay: Path, pristine: Path, src: Path, digest: str) -> int:
    """Make `src` the patched tree from a copy of `pristine` and `overlay` (make_overlay), marked
    prepared for llamacpp.build; refuses an overlay made from other patches. Returns the count."""
    with tarfile.open(overlay) as tf:
        member = tf.extractfile(OVERLAY_HASH)
        if member is None or member.read().decode() != digest:
            raise UserError(f"{overlay.name} was made from other patches/ or ggml_ops/: "
                            "run python3 bench/gpu_check.py carry again")
        members = [m for m in tf.getmembers() if m.name != OVERLAY_HASH]
        tmp = src.with_name(f".{src.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(pristine, tmp, symlinks=True)
        (tmp / ".git").unlink(missing_ok=True)
        tf.extractall(tmp, members=members, filter="data")
    (tmp / llamacpp.PATCHED_STAMP).write_text(json.dumps({"overlay": overlay.name, "files": len(members)}))
    shutil.rmtree(src, ignore_errors=True)
    os.replace(tmp, src)
    return len(members)


# ---------------------------------------------------------------- GGUF comparison (no GPU)


def _rel(a, b) -> float:
    import numpy as np

    den = float(np.linalg.norm(a))
    return float(np.linalg.norm(a - b)) / den if den else float(np.linalg.norm(b))


def compare_ggufs(a: Path, b: Path) -> dict:
    """Two converter outputs of one model and options (e.g. CPU vs GPU): ranks, tensor names
    and types; non-factor tensors byte for byte (same source weights, and where quantized,
    quantized from the same floats); per factor pair the relative Frobenius error of A and B
    after aligning each rank component's sign, and of the product A @ B."""
    import numpy as np

    from asvd2gguf.gguf_read import describe_gguf, open_gguf, tensor_array

    ia, ib = describe_gguf(a), describe_gguf(b)
    ta = {t.name: t for t in open_gguf(a).tensors}
    tb = {t.name: t for t in open_gguf(b).tensors}
    res = {"ranks_equal": ia.ranks == ib.ranks, "only_one": sorted(set(ta) ^ set(tb)), "type_or_shape": [],
           "other": 0, "other_equal": 0, "other_unequal": [], "pairs": 0, "factor_err": 0.0, "factor_worst": "",
           "product_err": 0.0, "product_worst": "", "factor_type": None}
    common = sorted(set(ta) & set(tb))
    for name in common:
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            res["type_or_shape"].append(name)
    bad = set(res["type_or_shape"])
    for name in common:
        if ".lr_in." in name or ".lr_out." in name or name in bad:
            continue
        res["other"] += 1
        if np.array_equal(np.asarray(ta[name].data).view(np.uint8), np.asarray(tb[name].data).view(np.uint8)):
            res["other_equal"] += 1
        else:
            res["other_unequal"].append(name)
    for name in common:
        if not name.endswith(".lr_in.weight") or name in bad:
            continue
        base = name[: -len(".lr_in.weight")]
        out_name = f"{base}.lr_out.weight"
        if out_name not in ta or out_name not in tb or out_name in bad:
            continue
        res["factor_type"] = ta[name].tensor_type.name.lower()
        b_a, b_b = tensor_array(ta[name]), tensor_array(tb[name])  # B: (r, n)
        a_a, a_b = tensor_array(ta[out_name]), tensor_array(tb[out_name])  # A: (m, r)
        sign = np.sign((a_a * a_b).sum(0) + (b_a * b_b).sum(1))
        sign[sign == 0] = 1
        fe = max(_rel(a_a, a_b * sign), _rel(b_a, b_b * sign[:, None]))
        pe = _rel(a_a @ b_a, a_b @ b_b)
        res["pairs"] += 1
        if fe > res["factor_err"]:
            res["factor_err"], res["factor_worst"] = fe, base
        if pe > res["product_err"]:
            res["product_err"], res["product_worst"] = pe, base
    return res


def reencode_equal(path: Path, device: str, qtypes=("q8_0", "nf4")) -> dict[str, tuple[int, int]]:
    """Quantize every factor tensor of a float file on `device` and on the CPU (the converter's
    encode): {qtype: (tensors with equal bytes, tensors)}. Same floats in, same bytes out."""
    import torch

    from asvd2gguf.gguf_read import open_gguf, tensor_array
    from asvd2gguf.quantize import encode

    res = {}
    tensors = [t for t in open_gguf(path).tensors if ".lr_in." in t.name or ".lr_out." in t.name]
    for q in qtypes:
        same = 0
        for t in tensors:
            x = torch.from_numpy(tensor_array(t).copy())
            qa = encode(x, q, t.name, None, torch.device("cpu"))
            qb = encode(x, q, t.name, None, torch.device(device))
            same += int(torch.equal(qa.data, qb.data))
        res[q] = (same, len(tensors))
    return res


# ---------------------------------------------------------------- the run


@dataclass
class Cmd:
    """One command of the plan. `tool`: a llama.cpp binary, prepended from the build at run time."""

    name: str  # log file stem, unique
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    gpu: bool = True  # needs the GPU (or the CUDA toolkit): listed, not run, by --dry-run
    tool: str | None = None

    def line(self, tool_dir: Path | None) -> str:
        pre = "".join(f"{k}={shlex.quote(v)} " for k, v in self.env.items())
        head = [str((tool_dir or Path("<bin>")) / self.tool)] if self.tool else []
        return pre + shlex.join(head + [str(a) for a in self.argv])


@dataclass
class Done:
    rc: int
    out: str
    seconds: float


@dataclass
class Check:
    step: str
    what: str
    result: str
    limit: str = ""
    ok: bool | None = None  # None: not run (dry run) or information only


class Run:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.dry = a.dry_run
        self.t0 = time.time()
        self.deadline = self.t0 + a.time_limit
        self.work = a.work.resolve()
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        for old in self.logs.glob("*.log"):
            old.unlink()
        self.lock = threading.Lock()
        self.checks: list[Check] = []
        self.timings: dict[str, float] = {}
        self.info: dict[str, str] = {}
        self.threads = a.threads or os.cpu_count() or 2
        self.bins: Path | None = a.bins.resolve() if a.bins else None  # the CUDA build's bin folder

    # -- output
    def say(self, step: str, msg: str) -> None:
        with self.lock:
            print(f"[{step}] {msg}", flush=True)

    def check(self, step: str, what: str, result: str, limit: str = "", ok: bool | None = None) -> None:
        with self.lock:
            self.checks.append(Check(step, what, result, limit, ok))
        mark = {True: "PASS", False: "FAIL", None: "--"}[ok]
        self.say(step, f"{mark} {what}: {result}" + (f" (limit {limit})" if limit else ""))

    def not_run(self, step: str, what: str, note: str = "") -> None:
        """A command that did not run: expected in a dry run (its GPU half), a failure otherwise."""
        self.check(step, what, ("not run (dry run)" if self.dry else "not run") + note, ok=None if self.dry else False)

    # -- tools
    def shown_tool_dir(self) -> Path:
        """Where the commands take llama.cpp from on the host: the CUDA build."""
        if self.bins is not None:
            return self.bins
        return llamacpp.bin_dir(cuda=True, tests=True)

    def exec_tool_dir(self, tool: str) -> Path | None:
        """Where a command that needs no GPU takes its tool from: the CUDA build on the host; a
        cached CPU build in a dry run (None if there is none: a dry run never builds)."""
        if not self.dry:
            return self.bins
        tests = tool in llamacpp.TEST_TARGETS
        return llamacpp.built(tests=tests, targets=[tool])

    def exec(self, step: str, cmd: Cmd) -> Done | None:
        """Run `cmd` (output to logs/<name>.log) unless it needs the GPU in a dry run; None if not run."""
        self.say(step, "$ " + cmd.line(self.shown_tool_dir() if cmd.tool else None))
        if self.dry and cmd.gpu:
            return None
        argv = [str(a) for a in cmd.argv]
        if cmd.tool:
            tdir = self.exec_tool_dir(cmd.tool)
            if tdir is None:
                why = "no CPU build of llama.cpp is cached" if self.dry else "no llama.cpp build (build step failed?)"
                self.say(step, f"   not run: {why}")
                return None
            argv = [str(tdir / cmd.tool)] + argv
            if self.dry:
                self.say(step, f"   (dry run: with the CPU build in {tdir})")
        left = self.deadline - time.time() - REPORT_RESERVE_S
        if left < 1:
            self.check(step, cmd.name, "not run: the run's time limit is reached", ok=False)
            return None
        log = self.logs / f"{cmd.name}.log"
        t = time.time()
        with open(log, "w") as fh:
            fh.write(f"$ {cmd.line(Path(argv[0]).parent if cmd.tool else None)}\n")
            fh.flush()
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                    env=dict(os.environ, **cmd.env))
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: cmake/ninja/nvcc children too
                proc.wait()
                rc = 124
        out = log.read_text(errors="replace")
        secs = time.time() - t
        status = "ok" if rc == 0 else ("TIMED OUT" if rc == 124 else f"FAILED (exit {rc}): {last_error(out)}")
        self.say(step, f"   {status}, {secs:.1f} s ({log.name})")
        return Done(rc, out, secs)

    def step(self, name: str, fn) -> None:
        if name not in self.a.steps:
            return
        t = time.time()
        self.say(name, f"start (budget {BUDGET_S[name]} s)")
        try:
            fn(self)
        except Exception as e:  # one failing step must not cost the report of the others
            (self.logs / f"{name}-traceback.log").write_text(traceback.format_exc())
            self.check(name, "step", f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                       ok=False)
        self.timings[name] = time.time() - t
        over = " OVER BUDGET" if self.timings[name] > BUDGET_S[name] else ""
        self.say(name, f"done in {self.timings[name]:.1f} s (budget {BUDGET_S[name]} s){over}")

    # -- paths
    def file(self, device: str, key: str) -> Path:
        return self.work / device / f"{key}.gguf"

    def tool_threads(self) -> list[str]:
        return ["-t", str(self.threads)]


# ---------------------------------------------------------------- steps


def step_env(run: Run) -> None:
    a = run.a
    smi = shutil.which("nvidia-smi")
    query = Cmd("env-nvidia-smi", [smi or "nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                                   "--format=csv,noheader"])
    if smi is None and not run.dry:
        if not a.arch:
            raise UserError("nvidia-smi not found: not a CUDA host (--dry-run lists the plan anywhere)")
        done = None
    else:
        done = run.exec("env", query)
    if a.arch:
        gpus = [{"name": "(--arch)", "compute_cap": f"{a.arch[:-1]}.{a.arch[-1]}", "driver": "", "memory": ""}]
    elif done is not None and done.rc == 0:
        gpus = parse_gpus(done.out)
    elif run.dry:
        gpus = [{"name": "(dry run: assumed)", "compute_cap": "9.0", "driver": "", "memory": ""}]
    else:
        raise UserError(f"nvidia-smi failed: {last_error(done.out) if done else 'not found'} (not a CUDA host?)")
    archs = cuda_archs(gpus)
    os.environ["CUDAARCHS"] = archs  # llamacpp.build keys the CUDA build on it; cmake reads it
    run.info["gpu"] = "; ".join(f"{g['name']} (" + ", ".join(x for x in (
        f"compute {g['compute_cap']}", g["memory"], g["driver"] and f"driver {g['driver']}") if x) + ")" for g in gpus)
    run.info["CUDAARCHS"] = archs
    run.check("env", "GPU", run.info["gpu"], ok=None if run.dry else True)
    run.check("env", "CMAKE_CUDA_ARCHITECTURES (CUDAARCHS)", archs, ok=None if run.dry else True)
    nvcc = find_nvcc()
    if nvcc:
        res = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
        run.info["nvcc"] = f"{nvcc}: " + (res.stdout.strip().splitlines() or ["?"])[-1]
        if not shutil.which("nvcc"):
            os.environ["CUDACXX"] = nvcc  # cmake's CUDA compiler when nvcc is not on PATH
    run.check("env", "nvcc", run.info.get("nvcc", "not found"), ok=None if run.dry else nvcc is not None)
    where, extra = find_cublas(nvcc, None, run.work / "cublas-links")
    os.environ.update(extra)  # the build and every llama.cpp run inherit it
    run.info["cuBLAS"] = where
    run.check("env", "cuBLAS for the build", where, ok=None if run.dry else where != "not found")
    import torch

    cuda_ok = torch.cuda.is_available()
    run.info["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda}, available: {cuda_ok})"
    run.check("env", "torch", run.info["torch"], ok=None if run.dry else cuda_ok)
    run.info["cores"] = str(os.cpu_count())
    src = cache_root() / "src" / f"llama.cpp-{COMMIT}"
    tree = CARRY / f"llama.cpp-{COMMIT}.tar.xz"
    if not (src / "CMakeLists.txt").is_file() and tree.is_file():
        src.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tree) as tf:
            tf.extractall(src.parent, filter="data")
        run.say("env", f"unpacked {tree.name} into {src.parent}")
    if shutil.which("git") is None:  # llamacpp applies patches/ with git apply: use the carried result
        target = llamacpp.source_dir(cuda=True, tests=True)
        if not (target / llamacpp.PATCHED_STAMP).is_file():
            overlay = CARRY / "patched-overlay.tar.xz"
            if not overlay.is_file():
                raise UserError("git is not installed and .gpu_carry has no patched-overlay.tar.xz")
            n = apply_overlay(overlay, src, target, patch_hash())
            run.say("env", f"no git: patched tree from {overlay.name} ({n} files) in {target}")
        run.check("env", "patch series", f"no git: the carried overlay, prepared in {target}")
    else:
        run.check("env", "patch series", "git apply, by the build")
    for what, p in (("model", a.model), ("text", a.text), ("calibration text", a.calib)):
        if not Path(p).exists() and p != "smollm2":
            raise UserError(f"{what} not found: {p} (on a GPU host: carry .gpu_carry, see docs/runtime.md)")


def step_build(run: Run) -> None:
    if run.bins is not None:
        missing = [t for t in GPU_TARGETS if not (run.bins / t).is_file()]
        res = f"{run.bins}" + (f"; missing {', '.join(missing)}" if missing else "")
        run.check("build", "CUDA build (--bins)", res, ok=not missing)
        return
    cmd = Cmd("build", [sys.executable, "-m", "asvd2gguf.cli", "build-llama", "--cuda", "--tests", "--jobs",
                        str(run.threads), *[x for t in GPU_TARGETS for x in ("--target", t)]],
              env={"CUDAARCHS": os.environ.get("CUDAARCHS", "")})
    for c in llamacpp.build_commands(cuda=True, jobs=run.threads, tests=True, targets=GPU_TARGETS):
        run.say("build", "   # runs: " + shlex.join(c))
    done = run.exec("build", cmd)
    if done is None:
        run.not_run("build", f"CUDA build ({len(GPU_TARGETS)} targets, CUDAARCHS={cmd.env['CUDAARCHS']})")
        return
    root = llamacpp.built(cuda=True, tests=True, targets=GPU_TARGETS)  # the same key: CUDAARCHS is set
    log = llamacpp.source_dir(cuda=True, tests=True).parent / "build.log"
    if log.is_file():
        shutil.copy(log, run.logs / "build-cmake.log")
    ok = done.rc == 0 and root is not None
    if ok:
        run.bins = root
    run.check("build", f"CUDA build ({len(GPU_TARGETS)} targets, CUDAARCHS={cmd.env['CUDAARCHS']})",
              f"{done.seconds:.0f} s, {run.threads} jobs" if ok else f"failed: {last_error(done.out)}", ok=ok)


def _tiny_models(run: Run) -> dict[str, Path]:
    """The tests' tiny llama / qwen2 (tests/conftest.py make_tiny), built once under the work folder."""
    root = run.work / "tiny"
    models = {arch: root / arch for arch in TINY_ARCHS}
    if all((p / "config.json").is_file() for p in models.values()):
        return models
    spec = importlib.util.spec_from_file_location("asvd2gguf_tests_conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    tok_root = root / "tok"
    shutil.rmtree(tok_root, ignore_errors=True)
    tok_root.mkdir(parents=True)
    tok = conftest.build_tokenizer(tok_root)
    for arch, p in models.items():
        shutil.rmtree(p, ignore_errors=True)
        conftest.make_tiny(arch, p, tok)
    return models


def _convert_cmd(run: Run, device: str, key: str, model: str, opts: list[str], tiny: bool,
                 extra: list[str] = ()) -> Cmd:
    out = run.file(device, key)
    samples, seqlen = ("8", "128") if tiny else (str(run.a.calib_samples), str(run.a.calib_seqlen))
    conv = ["convert", model, *opts, "--calib", str(run.a.calib), "--calib-samples", samples, "--calib-seqlen",
            seqlen, "--seed", "233", "--cache-dir", str(run.work / f"cache-{device}"), "--out", str(out), "--force",
            *extra]
    # beside the build on the host: leave most cores to nvcc; alone (dry run) take them all.
    # COLUMNS: rich wraps the converter's summary line at the terminal width (80 in a pipe)
    env = {"OMP_NUM_THREADS": str(run.threads if run.dry else max(2, run.threads // 4)), "COLUMNS": "200"}
    if device == "cpu":
        return Cmd(f"convert-{key}-cpu", [sys.executable, "-m", "asvd2gguf.cli", *conv, "--device", "cpu"], env=env,
                   gpu=False)
    dev = [] if "--device-map" in extra else ["--device", "cuda"]
    return Cmd(f"convert-{key}-{device}", [sys.executable, str(Path(__file__).resolve()), "peak", "--", *conv, *dev],
               env=env)


def step_convert(run: Run) -> None:
    models = _tiny_models(run)
    run.say("convert", f"tiny models in {models['llama'].parent}")
    for d in ("cpu", "cuda"):
        (run.work / d).mkdir(parents=True, exist_ok=True)
    dm = run.work / "tiny-device-map.json"
    dm.write_text(json.dumps(TINY_MAP))
    cpu = [_convert_cmd(run, "cpu", k, str(run.a.model), o, False) for k, o in SMOL_VARIANTS.items()]
    cpu += [_convert_cmd(run, "cpu", f"tiny-{a}", str(models[a]), TINY_OPTS, True) for a in TINY_ARCHS]
    gpu = [_convert_cmd(run, "cuda", k, str(run.a.model), SMOL_VARIANTS[k], False) for k in GPU_SMOL]
    gpu += [_convert_cmd(run, "cuda", f"tiny-{a}", str(models[a]), TINY_OPTS, True) for a in TINY_ARCHS]
    gpu.append(_convert_cmd(run, "cuda", "tiny-llama-map", str(models["llama"]), TINY_OPTS, True,
                            ["--device-map", str(dm)]))

    def lane(cmds: list[Cmd], device: str) -> None:
        for i, cmd in enumerate(cmds):
            key = cmd.name[len("convert-"): -len(f"-{device}")]
            what = f"convert {key} --device {device}" + (" (cold cache)" if i == 0 else "")
            done = run.exec("convert", cmd)
            if done is None:
                run.not_run("convert", what)
                continue
            r = parse_convert(done.out)
            res = f"wall {done.seconds:.1f} s" + (f" (pipeline {r['pipeline_s']:.1f} s)" if "pipeline_s" in r else "")
            if "peak_gpu_mib" in r:
                res += f", peak GPU {r['peak_gpu_mib']:.0f} MiB"
            if "ratio" in r:
                res += f", ratio {r['ratio']:.3f}, KV {r['kv']:.3f}"
            run.check("convert", what, res if done.rc == 0 else f"failed: {last_error(done.out)}", ok=done.rc == 0)

    if run.dry:  # sequential: the plan reads in order
        lane(cpu, "cpu")
        lane(gpu, "cuda")
    else:
        t = threading.Thread(target=lane, args=(gpu, "cuda"))
        t.start()
        lane(cpu, "cpu")
        t.join()


def step_compare(run: Run) -> None:
    pairs = [(k, k) for k in GPU_SMOL] + [(f"tiny-{a}", f"tiny-{a}") for a in TINY_ARCHS]
    pairs.append(("tiny-llama", "tiny-llama-map"))
    for ref, key in pairs:
        a_dev, b_dev = ("cuda", "cuda") if key.endswith("-map") else ("cpu", "cuda")
        a, b = run.file(a_dev, ref), run.file(b_dev, key)
        what = f"{key} --device-map (GPU+CPU) vs --device cuda" if key.endswith("-map") else f"{key} cuda vs cpu"
        if run.dry:
            if not a.is_file():
                run.check("compare", what, "not run (dry run; no CPU file)")
                continue
            b, what = a, f"{ref} cpu vs itself (dry run: the comparison code on a real file)"
        elif not (a.is_file() and b.is_file()):
            run.check("compare", what, f"input missing: {a.name if not a.is_file() else b.name}", ok=False)
            continue
        r = compare_ggufs(a, b)
        qt = r["factor_type"] or "f16"
        ptol = PRODUCT_TOL.get(qt, 0.25)
        floats = qt in ("f16", "f32", "bf16")
        ok = (r["ranks_equal"] and not r["only_one"] and not r["type_or_shape"] and not r["other_unequal"]
              and r["product_err"] <= ptol and (not floats or r["factor_err"] <= FACTOR_TOL))
        res = (f"ranks {'equal' if r['ranks_equal'] else 'DIFFER'}; {r['other_equal']}/{r['other']} other tensors "
               f"bytes equal; {r['pairs']} {qt} factor pairs: product err {fmt(r['product_err'])}"
               + (f", factor err {fmt(r['factor_err'])} (sign-aligned)" if floats else ""))
        if r["only_one"] or r["type_or_shape"]:
            res += f"; tensor set/type differs: {(r['only_one'] + r['type_or_shape'])[:3]}"
        if r["other_unequal"]:
            res += f"; unequal: {r['other_unequal'][:3]}"
        limit = f"product <= {ptol:g}" + (f", factors <= {FACTOR_TOL:g}" if floats else "")
        run.check("compare", what, res, limit, ok=None if run.dry else ok)
    src = run.file("cpu" if run.dry else "cuda", "kv0.5")
    if src.is_file():
        device = "cpu" if run.dry else "cuda"
        res = reencode_equal(src, device)
        ok = all(s == n for s, n in res.values())
        text = "; ".join(f"{q}: {s}/{n} tensors bytes equal" for q, (s, n) in res.items())
        run.check("compare", f"quantize on {device} vs cpu, same floats ({src.name} factors)"
                  + (" (dry run: cpu vs cpu)" if run.dry else ""), text, "all equal", ok=None if run.dry else ok)


def step_backend_ops(run: Run) -> None:
    for label, filt, need_cases in BACKEND_OPS:
        name = "backend-ops-" + re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()
        cmd = Cmd(name, ["test", *filt], tool="test-backend-ops")
        done = run.exec("backend-ops", cmd)
        versus = "CUDA vs CPU"
        if done is None and run.dry:  # the same filter with the CPU as backend: exercises the parser
            done = run.exec("backend-ops", Cmd(name + "-cpu", ["test", "-b", "CPU", *filt], gpu=False,
                                               tool="test-backend-ops"))
            versus = "dry run: CPU vs CPU"
        if done is None:
            run.not_run("backend-ops", f"{label} ({versus})")
            continue
        per = {k: v for k, v in parse_backend_ops(done.out).items() if run.dry or not k.startswith("CPU")}
        if not per:
            run.check("backend-ops", f"{label} ({versus})", f"no backend tested (exit {done.rc}): "
                      f"{last_error(done.out)}", ok=None if run.dry else False)
            continue
        for bk, r in per.items():
            ok = (done.rc == 0 and r["status"] == "OK" and r["passed"] == r["total"]
                  and (r["total"] > 0 or not need_cases))
            res = f"{bk}: {r['passed']}/{r['total']} passed, {r['not_supported']} not supported"
            if r["failed"]:
                res += f"; failed: {', '.join(r['failed'][:3])}"
            run.check("backend-ops", f"{label} ({versus})", res, "all supported cases pass" +
                      (", at least one" if need_cases else ""), ok=None if run.dry else ok)


def _ppl_cmd(run: Run, name: str, model: Path, chunks: int, extra: list[str], base: Path, gpu: bool,
             env: dict | None = None, score: bool = True) -> Cmd:
    args = ["-m", str(model), "-f", str(run.a.text), "-c", str(run.a.ctx), "--chunks", str(chunks),
            *run.tool_threads()]
    args += ["-ngl", "99"] if gpu else ["-ngl", "0", "-dev", "none", "--no-op-offload"]
    args += ["--kl-divergence-base", str(base)] + (["--kl-divergence"] if score else [])
    return Cmd(name, args + list(extra), env=dict(env or {}), gpu=gpu, tool="llama-perplexity")


def step_ppl(run: Run) -> None:
    kld_dir = run.work / "kld"
    kld_dir.mkdir(parents=True, exist_ok=True)
    self_checked = False
    cpu_runs: dict[tuple[str, int], dict] = {}
    for label, key, extra, lim in PPL_ROWS:
        model = run.file("cpu", key)
        if not model.is_file():
            run.check("ppl", f"{label}", f"input missing: {model.name} (convert step)", ok=None if run.dry else False)
            continue
        tag = key + ("-q8cache" if "-ctk" in extra else "")
        latent = key == "kv0.5"
        modes = [("prefill", run.a.chunks, [])] + ([("decode", DECODE_CHUNKS, ["-ub", "1"])] if latent else [])
        for mode, chunks, mode_args in modes:
            base = kld_dir / f"{tag}-{chunks}.kld"
            if (tag, chunks) not in cpu_runs:  # the CPU reference (batched) serves both modes
                done = run.exec("ppl", _ppl_cmd(run, f"ppl-{tag}-{chunks}-cpu", model, chunks, extra, base, False,
                                                score=False))
                if done is None:
                    run.not_run("ppl", f"{label}, {mode}", " (no CPU reference)")
                    continue
                if done.rc != 0:
                    run.check("ppl", f"{label}, {mode}", f"CPU run failed: {last_error(done.out)}", ok=False)
                    continue
                cpu_runs[(tag, chunks)] = llamacpp.parse_perplexity(done.out)
            cpu = cpu_runs[(tag, chunks)]
            envs = LATENT_ENVS if latent else ({},)
            for env in envs:
                etag = "".join(f"-{v}" for v in env.values()) or ""
                what = f"{label}, {mode}" + (f" ({', '.join(f'{k}={v}' for k, v in env.items())})" if env else "")
                cmd = _ppl_cmd(run, f"ppl-{tag}-{mode}{etag}-cuda", model, chunks, extra + mode_args, base, True, env)
                g = run.exec("ppl", cmd)
                if g is None and run.dry and not self_checked:  # the KLD parser on real output, once
                    g = run.exec("ppl", _ppl_cmd(run, f"ppl-{tag}-{mode}-cpu-self", model, chunks, extra, base, False))
                    what += " (dry run: CPU vs its own base)"
                    self_checked = True
                if g is None:
                    run.not_run("ppl", what, f"; CPU PPL {fmt(cpu.get('ppl'))}")
                    continue
                r = llamacpp.parse_perplexity(g.out)
                if g.rc != 0 or "kld" not in r:
                    run.check("ppl", what, f"failed: {last_error(g.out)}", ok=False)
                    continue
                ok = r["kld"] < KLD_LIMIT[lim]
                res = (f"KLD mean {fmt(r['kld'])}, max {fmt(r.get('kld_max'))}, same top "
                       f"{100 * r.get('same_top_p', 0):.2f}%; PPL {fmt(r.get('ppl'))} (CPU {fmt(cpu.get('ppl'))}), "
                       f"{chunks} x {run.a.ctx}")
                run.check("ppl", what, res, f"KLD < {KLD_LIMIT[lim]:g}", ok=None if run.dry else ok)


def step_bench(run: Run) -> None:
    speeds: dict[str, dict] = {}
    for label, key, env in BENCH_ROWS:
        model = run.file("cpu", key)
        if not model.is_file():
            run.check("bench", label, f"input missing: {model.name} (convert step)", ok=None if run.dry else False)
            continue
        etag = "".join(f"-{v}" for v in env.values())
        cmd = Cmd(f"bench-{key}{etag}", ["-m", str(model), "-ngl", "99", *run.tool_threads(), "-r", "3", "-p", "512",
                                         "-n", "128", "-d", "0,4096", "-o", "json"], env=dict(env), tool="llama-bench")
        done = run.exec("bench", cmd)
        note = ""
        if done is None and run.dry and not speeds:  # small CPU run: the parser on real output
            done = run.exec("bench", Cmd(cmd.name + "-cpu", ["-m", str(model), "-ngl", "0", *run.tool_threads(),
                                                             "-r", "1", "-p", "32", "-n", "4", "-d", "0", "-o", "json"],
                                         env=dict(env), gpu=False, tool="llama-bench"))
            note = " (dry run: CPU, pp32/tg4)"
        if done is None:
            run.not_run("bench", label)
            continue
        r = parse_bench(done.out)
        speeds[label] = r
        want = ("pp32@d0", "tg4@d0") if note else BENCH_KEYS
        ok = done.rc == 0 and all(k in r for k in want)
        res = ", ".join(f"{k} {r[k]:.1f}" for k in r) + " t/s" if r else f"failed: {last_error(done.out)}"
        run.check("bench", label + note, res, ok=None if run.dry else ok)
    if "dense F16" in speeds and "tg128@d4096" in speeds["dense F16"]:
        d = speeds["dense F16"]["tg128@d4096"]
        for label, r in speeds.items():
            if label != "dense F16" and "tg128@d4096" in r:
                run.check("bench", f"{label} tg128@d4096 / dense", f"{r['tg128@d4096'] / d:.2f}x")
    for key in ("dense", "kv0.5"):  # KV cache size at n_ctx 8192, on the GPU
        model = run.file("cpu", key)
        if not model.is_file():
            continue
        kv_args = ["-m", str(model), "-c", "8192", "-n", "1", "-p", "Hello", "-no-cnv", "--no-warmup", "-lv", "4",
                   *run.tool_threads()]
        cmd = Cmd(f"kv-{key}", [*kv_args, "-ngl", "99"], tool="llama-completion")
        done = run.exec("bench", cmd)
        if done is None and run.dry:
            done = run.exec("bench", Cmd(cmd.name + "-cpu", [*kv_args, "-ngl", "0"], gpu=False,
                                         tool="llama-completion"))
        if done is None:
            run.not_run("bench", f"KV cache at n_ctx 8192, {key}")
            continue
        kv = parse_kv_mib(done.out)
        run.check("bench", f"KV cache at n_ctx 8192, {key}" + (" (dry run: CPU)" if run.dry else ""),
                  f"{kv:.1f} MiB" if kv is not None else f"not found: {last_error(done.out)}",
                  ok=None if run.dry else (done.rc == 0 and kv is not None))


# ---------------------------------------------------------------- report


def render(run: Run) -> str:
    a = run.a
    lines = ["# GPU check (bench/gpu_check.py)", ""]
    mode = "dry run: GPU commands listed, not run; the CPU ones ran" if run.dry else "run on a CUDA host"
    lines.append(f"- mode: {mode}; steps: {', '.join(a.steps)}; total {time.time() - run.t0:.0f} s "
                 f"(limit {a.time_limit} s)")
    for k in ("gpu", "CUDAARCHS", "nvcc", "cuBLAS", "torch", "cores"):
        if k in run.info:
            lines.append(f"- {k}: {run.info[k]}")
    lines.append(f"- model: {Path(str(a.model)).name}; text: {Path(a.text).name}, {a.chunks} x {a.ctx} tokens; "
                 f"calibration: {Path(a.calib).name}, {a.calib_samples} x {a.calib_seqlen}, seed 233")
    lines += ["", "| step | budget s | wall s | within budget |", "|---|---|---|---|"]
    for s in STEPS:
        if s in run.timings:
            w = run.timings[s]
            lines.append(f"| {s} | {BUDGET_S[s]} | {w:.1f} | {'yes' if w <= BUDGET_S[s] else 'NO'} |")
    lines += ["", "| step | check | result | limit | status |", "|---|---|---|---|---|"]
    for c in run.checks:
        status = {True: "PASS", False: "**FAIL**", None: "--"}[c.ok]
        cells = [c.step, c.what, c.result, c.limit, status]
        lines.append("| " + " | ".join(x.replace("|", "/") for x in cells) + " |")
    failed = sum(c.ok is False for c in run.checks)
    passed = sum(c.ok is True for c in run.checks)
    lines += ["", f"{passed} passed, {failed} failed, {sum(c.ok is None for c in run.checks)} not run or information"]
    return "\n".join(lines) + "\n"


def write_report(run: Run) -> Path:
    out = run.a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    md = render(run)
    (out / "gpu_check.md").write_text(md)
    (out / "gpu_check.json").write_text(json.dumps({
        "dry_run": run.dry, "steps": run.a.steps, "info": run.info, "timings_s": run.timings,
        "budgets_s": BUDGET_S, "checks": [c.__dict__ for c in run.checks]}, indent=1))
    # the device tool brings back at most 8 files from $OUT: the logs travel as one archive
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tf:
        tf.add(run.logs, arcname="logs")
    return out


# ---------------------------------------------------------------- entry points


def _steps(spec: str) -> list[str]:
    steps = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        names = ", ".join(bad) or "(none)"
        raise argparse.ArgumentTypeError(f"unknown step(s) {names}; choose from {', '.join(STEPS)}")
    return [s for s in STEPS if s in steps or s == "env"]  # env always: it sets the architecture


def _default_model() -> str:
    carried = CARRY / f"smollm2-{CARRY_LAYERS}l.gguf"
    return str(carried) if carried.is_file() else "smollm2"


def _default_wiki(name: str) -> Path:
    carried = CARRY / "wikitext-2" / name
    return carried if carried.is_file() else ROOT.parent / "shared" / "data" / "wikitext-2" / name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0],
                                 epilog="Also: 'gpu_check.py carry --help' (prepare .gpu_carry on the CPU machine).")
    ap.add_argument("--dry-run", action="store_true", help="list every command; run only those that need no GPU")
    ap.add_argument("--steps", type=_steps, default=list(STEPS), help=f"comma list of {', '.join(STEPS)}")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"),
                    help="report and logs (default: $OUT, else ./gpu_check_out)")
    ap.add_argument("--work", type=Path, default=ROOT / ".gpu_cache" / "work",
                    help="converted files, KLD bases, logs (default .gpu_cache/work)")
    ap.add_argument("--bins", type=Path, help="a CUDA build's bin folder to use instead of building")
    ap.add_argument("--arch", help="compute capability digits, e.g. 90 (default: from nvidia-smi)")
    ap.add_argument("--model", default=_default_model(), help="GGUF to convert (default: the carried SmolLM2, "
                    "else the full embedded smollm2)")
    ap.add_argument("--text", type=Path, default=_default_wiki("wiki.test.raw"))
    ap.add_argument("--calib", type=Path, default=_default_wiki("wiki.valid.tokens"))
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="threads and build jobs (default: all cores)")
    ap.add_argument("--time-limit", type=int, default=TIME_LIMIT_S, help="seconds for the whole run")
    a = ap.parse_args(argv)
    if a.arch is not None and not re.fullmatch(r"\d{2,3}", a.arch):
        ap.error(f"--arch must be compute capability digits such as 90, got {a.arch!r}")
    if a.chunks < 1 or a.ctx < 16 or a.time_limit < 30:
        ap.error("--chunks must be >= 1, --ctx >= 16 and --time-limit >= 30")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    run = Run(a)
    print(f"gpu_check: {'DRY RUN, ' if run.dry else ''}steps {', '.join(a.steps)}; budgets "
          + ", ".join(f"{s} {BUDGET_S[s]} s" for s in a.steps) + f"; time limit {a.time_limit} s", flush=True)
    run.step("env", step_env)
    if any(c.ok is False for c in run.checks) and not run.dry:
        print("gpu_check: the environment is not a usable CUDA host; stopping", flush=True)
    else:
        lane = threading.Thread(target=lambda: (run.step("convert", step_convert), run.step("compare", step_compare)))
        if run.dry:
            run.step("build", step_build)
            lane.run()
            run.step("backend-ops", step_backend_ops)
        else:
            lane.start()
            run.step("build", step_build)
            if run.bins is None and any(s in a.steps for s in ("backend-ops", "ppl", "bench")):
                run.bins = llamacpp.built(cuda=True, tests=True, targets=GPU_TARGETS)  # from an earlier run
            run.step("backend-ops", step_backend_ops)  # needs no converted file: beside the lane's tail
            lane.join()
        run.step("ppl", step_ppl)
        run.step("bench", step_bench)
    out = write_report(run)
    print()
    print(render(run), end="", flush=True)
    print(f"gpu_check: report {out / 'gpu_check.md'}, logs {out / 'logs.tar.gz'}", flush=True)
    return 1 if any(c.ok is False for c in run.checks) else 0


def peak_main(argv: list[str]) -> int:
    """`gpu_check.py peak -- ARGS`: run `asvd2gguf ARGS` in this process, then print the peak
    GPU memory torch allocated (torch.cuda.max_memory_allocated), for the GPU conversions."""
    import torch

    from asvd2gguf.cli import main as cli_main

    if argv[:1] == ["--"]:
        argv = argv[1:]
    sys.argv = ["asvd2gguf", *argv]
    code = 0
    try:
        cli_main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if torch.cuda.is_available():
        print(f"gpu_check: peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB", file=sys.stderr)
    return code


def keep_layers(n_total: int, n_keep: int) -> list[int]:
    """Which blocks a cut-down model keeps: the first half and the last half of n_keep. Dropping
    middle blocks leaves a working model (ShortGPT, arXiv 2403.03853, finds them the most
    redundant); SmolLM2 cut to its first 16 blocks scores perplexity ~7e10, first 8 + last 8 does not."""
    if not 1 <= n_keep <= n_total:
        raise UserError(f"--layers must be in 1..{n_total}, got {n_keep}")
    head = (n_keep + 1) // 2
    return list(range(head)) + list(range(n_total - (n_keep - head), n_total))


def trim_gguf(src: Path, dst: Path, n_layer: int, embd_type: str = "q4_1") -> Path:
    """A copy of a llama-family GGUF with n_layer of its blocks (keep_layers, renumbered) and
    token_embd re-quantized to `embd_type` (the tied output head too): small enough to carry,
    with the same shapes, heads and tokenizer. Written to a temporary name, then renamed."""
    import gguf
    import numpy as np

    from asvd2gguf.ggml_quants import dequantize
    from asvd2gguf.gguf_fast import FastGGUFReader

    r = FastGGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    kept = keep_layers(int(r.fields[f"{arch}.block_count"].contents()), n_layer)
    new_index = {old: new for new, old in enumerate(kept)}
    tmp = dst.with_name(f".{dst.name}.tmp")
    w = gguf.GGUFWriter(tmp, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = n_layer if name == f"{arch}.block_count" else f.contents()
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, value, f.types[0], sub_type=sub)
    qt = gguf.GGMLQuantizationType[embd_type.upper()]
    for t in r.tensors:
        name = t.name
        m = re.match(r"blk\.(\d+)\.", name)
        if m:
            if int(m.group(1)) not in new_index:
                continue
            name = f"blk.{new_index[int(m.group(1))]}.{name[m.end():]}"
        if name == "token_embd.weight" and t.tensor_type != qt:
            arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, np.asarray(t.data), raw_shape=np.asarray(t.data).shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, dst)
    return dst


def carry_main(argv: list[str]) -> int:
    """`gpu_check.py carry`: write .gpu_carry/ for the device tool's `carry` (64 MiB with the tree)."""
    ap = argparse.ArgumentParser(prog="gpu_check.py carry", description="Prepare .gpu_carry/ on the CPU machine: "
                                 "the llama.cpp tree (trimmed), SmolLM2's first blocks, WikiText, the gguf wheel.")
    ap.add_argument("--dest", type=Path, default=CARRY)
    ap.add_argument("--layers", type=int, default=CARRY_LAYERS)
    ap.add_argument("--limit-mib", type=float, default=CARRY_LIMIT_MIB)
    a = ap.parse_args(argv)
    from asvd2gguf.llamacpp_tree import source_tree
    from asvd2gguf.source import embedded_path

    dest = a.dest
    dest.mkdir(parents=True, exist_ok=True)
    tree = dest / f"llama.cpp-{COMMIT}.tar.xz"
    if not tree.is_file():
        src = source_tree()
        skip = {f"{src.name}/{x}" for x in TREE_EXCLUDE}
        tmp = tree.with_name(f".{tree.name}.tmp")
        with tarfile.open(tmp, "w:xz", preset=9) as tf:
            tf.add(src, arcname=src.name, filter=lambda ti: None if ti.name in skip else ti)
        os.replace(tmp, tree)
    overlay = dest / "patched-overlay.tar.xz"  # the patch series applied, for a host without git
    n = make_overlay(llamacpp.patched_source(), source_tree(), overlay, patch_hash())
    print(f"{overlay.name}: {n} files differ from the pristine tree")
    model = dest / f"smollm2-{a.layers}l.gguf"
    if not model.is_file():
        trim_gguf(embedded_path("smollm2"), model, a.layers)
    wiki = dest / "wikitext-2"
    wiki.mkdir(exist_ok=True)
    for name in ("wiki.test.raw", "wiki.valid.tokens"):
        shutil.copy(ROOT.parent / "shared" / "data" / "wikitext-2" / name, wiki / name)
    wheels = dest / "wheels"
    if not list(wheels.glob("gguf-*.whl")):
        from importlib.metadata import version  # the gguf this project runs with

        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        f"gguf=={version('gguf')}", "-d", str(wheels)], check=True)
    files = [p for p in dest.rglob("*") if p.is_file()]
    carried = sum(p.stat().st_size for p in files) / 2**20
    res = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True)
    tree_mib = sum((ROOT / p).stat().st_size for p in res.stdout.decode().split("\0") if p and (ROOT / p).is_file())
    tree_mib /= 2**20
    for p in sorted(files):
        print(f"{p.stat().st_size / 2**20:8.2f} MiB  {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}")
    total = carried + tree_mib
    print(f"carried {carried:.2f} MiB + working tree {tree_mib:.2f} MiB = {total:.2f} MiB (limit {a.limit_mib} MiB)")
    if total > a.limit_mib:
        print(f"error: over the limit; use fewer --layers (now {a.layers})", file=sys.stderr)
        return 1
    return 0


def entry(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["peak"]:
            return peak_main(argv[1:])
        if argv[:1] == ["carry"]:
            return carry_main(argv[1:])
        return main(argv)
    except UserError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(entry())
