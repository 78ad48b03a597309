"""The patched llama.cpp runtime: build it, find its binaries, run its perplexity tool.

Why a build step of our own: factored GGUF files (docs/gguf-format.md) need a llama.cpp that
loads factor pairs and, for the latent KV cache, caches B_k x / B_v x. We pin one llama.cpp tree
(0c1e570, vendored in llama-cpp-python 0.3.36 on PyPI, sha256-checked by llamacpp_tree), apply the
patch series in patches/ in order, drop in the ggml code of ggml_ops/, and build only the tools
we use. Builds are cached under ~/.cache/asvd2gguf/llama.cpp by (source hash, hash of patches/
and ggml_ops/, options), so a second call with nothing changed returns at once, and ccache
makes a rebuild after a patch edit cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_dir, write_atomic
from .errors import UserError, require_file
from .llamacpp_tree import COMMIT, SDIST, SDIST_SHA256, cache_root, sdist_path, source_tree


def data_dir(name: str) -> Path:
    """The folder `name` ("patches" or "ggml_ops") this installation builds from.

    There is one copy of each: the top-level folder of the checkout. A wheel ships it as the
    data-only subpackage asvd2gguf.<name> (pyproject.toml maps the subpackage to that folder),
    so an installed package finds it next to this module and a checkout (editable install,
    PYTHONPATH) finds it one level up; both hold the same files, hence the same build key.
    """
    here = Path(__file__).resolve().parent
    for folder in (here / name, here.parent / name):
        if folder.is_dir():
            return folder
    return here / name  # missing everywhere: _series() names the path in its error


PATCH_DIR = data_dir("patches")
OPS_DIR = data_dir("ggml_ops")

# the tools a build makes (docs/runtime.md): offline tools, the OpenAI-compatible server and the
# chat CLI (LLAMA_BUILD_SERVER=ON; llama-cli runs on the server's code), and ggml's RPC server
# (GGML_RPC=ON, which also gives every tool --rpc)
TOOLS = ("llama-perplexity", "llama-completion", "llama-bench", "llama-quantize", "llama-imatrix")
SERVER_TOOLS = ("llama-server", "llama-cli")
RPC_TOOLS = ("ggml-rpc-server",)
TARGETS = TOOLS + SERVER_TOOLS + RPC_TOOLS
# extra targets of a build with tests=True (LLAMA_BUILD_TESTS=ON): ggml's op and quantization tests
TEST_TARGETS = ("test-backend-ops", "test-quantize-fns")

# where each kind of ggml_ops/ file goes in the tree (patches/0001 and 0004 add them to the build)
_OPS_DEST = {
    ".h": "ggml/include",
    ".c": "ggml/src",
    ".cpp": "ggml/src",
    ".cu": "ggml/src/ggml-cuda",
    ".cuh": "ggml/src/ggml-cuda",
}
# files in these ggml_ops/ subfolders belong to one backend: ggml_ops/<name>/* -> ggml/src/<name>/
_OPS_BACKEND_DIRS = ("ggml-cpu", "ggml-cuda")

_STAMP = ".asvd2gguf-complete"
PATCHED_STAMP = ".asvd2gguf-patched"  # in a source tree: patches/series applied, ggml_ops/ added


def _hash_dir(h: hashlib._Hash, folder: Path) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")


def _series() -> list[Path]:
    """The patches named in patches/series, in order (blank lines and # comments ignored)."""
    series = PATCH_DIR / "series"
    if not series.is_file():
        raise UserError(f"missing patch series file {series}")
    out = []
    for line in series.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        path = PATCH_DIR / name
        if not path.is_file():
            raise UserError(f"patch {name} is listed in patches/series but does not exist")
        out.append(path)
    return out


def _ops_files() -> list[tuple[Path, str]]:
    """(file of ggml_ops/, its folder in the llama.cpp tree) for every file the build adds."""
    out: list[tuple[Path, str]] = []
    if not OPS_DIR.is_dir():
        return out
    for path in sorted(OPS_DIR.iterdir()):
        dest = _OPS_DEST.get(path.suffix)
        if dest is not None and path.is_file():
            out.append((path, dest))
    for sub in _OPS_BACKEND_DIRS:
        folder = OPS_DIR / sub
        if folder.is_dir():
            out += [(p, f"ggml/src/{sub}") for p in sorted(folder.iterdir()) if p.is_file()]
    return out


def _options(cuda: bool, tests: bool = False) -> dict:
    opts = {"cuda": bool(cuda)}
    if cuda:
        opts["cuda_archs"] = os.environ.get("CUDAARCHS", "")
    if tests:
        opts["tests"] = True
    return opts


def _targets(tests: bool) -> tuple[str, ...]:
    # the tests build is its own root: only what the op tests need, not the server
    return TOOLS + TEST_TARGETS if tests else TARGETS


def build_key(cuda: bool = False, tests: bool = False) -> str:
    """Cache key: source sha256, contents of patches/ and ggml_ops/, and the build options."""
    h = hashlib.sha256()
    h.update(SDIST_SHA256.encode() + b"\0")
    h.update(b"patches\0")
    _hash_dir(h, PATCH_DIR)
    h.update(b"ggml_ops\0")
    if OPS_DIR.is_dir():
        _hash_dir(h, OPS_DIR)
    h.update(json.dumps(_options(cuda, tests), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _build_root(cuda: bool, prefix: Path | None, tests: bool = False) -> Path:
    base = Path(prefix) if prefix is not None else cache_root() / "llama.cpp"
    kind = ("cuda" if cuda else "cpu") + ("-tests" if tests else "")
    return base / f"{COMMIT}-{kind}-{build_key(cuda, tests)}"


def cmake_options(cuda: bool = False, tests: bool = False, ccache: bool = True) -> list[str]:
    """The -D options of a build (the binaries' and, minus what the sdist forces, the wheel's):
    no examples, app or network code; the server and RPC on; the UI not fetched (no network at
    build time: llama-server then serves its API without the web page)."""
    return ["-DCMAKE_BUILD_TYPE=Release", f"-DLLAMA_BUILD_TESTS={'ON' if tests else 'OFF'}",
            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_APP=OFF",
            "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
            "-DLLAMA_BUILD_UI=OFF", "-DGGML_RPC=ON", f"-DGGML_CCACHE={'ON' if ccache else 'OFF'}",
            f"-DGGML_CUDA={'ON' if cuda else 'OFF'}"]


@dataclass(frozen=True)
class BuildPlan:
    """What build() (or build_python()) would do, found without applying or compiling anything.

    root: the build root (cache key in its name); key: that key; patches: the series in order;
    ops: (ggml_ops file, folder it goes to in the tree); targets: the cmake targets; bin_dir: where
    the tools land; built: whether a finished build of this key is already there; wheel: the
    cached llama-cpp-python wheel of this key, if any.
    """

    root: Path
    key: str
    cuda: bool
    tests: bool
    patches: tuple[Path, ...]
    ops: tuple[tuple[Path, str], ...]
    targets: tuple[str, ...]
    cmake: tuple[str, ...]
    built: bool
    wheel: Path | None

    @property
    def bin_dir(self) -> Path:
        return self.root / "build" / "bin"


def plan(cuda: bool = False, prefix: Path | None = None, tests: bool = False,
         targets: Sequence[str] | None = None) -> BuildPlan:
    """The build of these options: the patch series and ggml_ops/ files found (raises UserError
    when patches/series or a patch it names is missing, or on a target the build does not make),
    its root and targets (default: all of the build's), whether they are built already."""
    root = _build_root(cuda, prefix, tests)
    targets = _check_targets(targets, tests)
    bin_dir = root / "build" / "bin"
    built = (root / _STAMP).is_file() and all((bin_dir / t).is_file() for t in targets)
    return BuildPlan(root=root, key=build_key(cuda, tests), cuda=cuda, tests=tests, patches=tuple(_series()),
                     ops=tuple(_ops_files()), targets=targets, cmake=tuple(cmake_options(cuda, tests)),
                     built=built, wheel=_cached_wheel(root))


@contextlib.contextmanager
def _locked(root: Path):
    """Hold an exclusive lock on a build root: two processes building the same key (two test
    sessions, two engineers) would otherwise delete and re-copy each other's source tree."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _say(console, msg: str) -> None:
    if console is not None:
        console.print(msg)


def _prepare_source(root: Path, console) -> Path:
    """Copy the pristine tree, apply the patch series, add ggml_ops/. Idempotent via a stamp."""
    src = root / "src"
    stamp = src / PATCHED_STAMP
    if stamp.is_file():
        return src
    if shutil.which("git") is None:  # only here: a prepared tree (stamp above) builds without it
        raise UserError("git is required to apply patches/ to llama.cpp but was not found on PATH")
    if src.exists():
        shutil.rmtree(src)
    pristine = source_tree()
    _say(console, f"[bold]copying[/] llama.cpp {COMMIT} to {src}")
    shutil.copytree(pristine, src, symlinks=True)
    git_file = src / ".git"  # the sdist keeps a submodule pointer that would confuse git apply
    if git_file.is_file():
        git_file.unlink()
    apply_patches(src, _series(), console)
    for path, dest in _ops_files():
        shutil.copy2(path, src / dest / path.name)
    stamp.write_text(json.dumps([p.name for p in _series()]))
    return src


def patched_source(cuda: bool = False, prefix: Path | None = None, console=None) -> Path:
    """The patched llama.cpp tree (patches applied, ggml_ops/ added) of the build with these
    options, prepared if needed without building: e.g. for scripts/check_cuda.sh."""
    root = _build_root(cuda, prefix)
    with _locked(root):
        return _prepare_source(root, console)


def apply_patches(src: Path, patches: Iterable[Path], console=None) -> None:
    """Apply patches to the tree src in order; the first that does not apply raises a
    UserError naming it (each is checked before it is applied, so none is half-applied)."""
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(Path(src).resolve().parent))
    for patch in patches:
        _say(console, f"[bold]applying[/] {patch.name}")
        for check in (True, False):
            cmd = ["git", "apply", "--whitespace=nowarn", "-p1"] + (["--check"] if check else []) + [str(patch)]
            res = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                detail = (res.stderr or res.stdout).strip().splitlines()
                raise UserError(f"patch {patch.name} does not apply to llama.cpp {COMMIT}: "
                                f"{detail[0] if detail else 'git apply failed'}")


# ninja's "[n/N] what": at the start of a line, or indented (pip -v indents a wheel build's output)
_NINJA_STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]")


def _run_logged(cmd: Sequence[str], log, env: dict, cwd: Path | None = None, progress=None, task=None) -> int:
    """Run cmd, append its output to log, advance a rich progress bar from ninja's [n/N]."""
    log.write(f"$ {' '.join(map(str, cmd))}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        m = _NINJA_STEP.match(line)
        if progress is not None and m:
            progress.update(task, completed=int(m.group(1)), total=int(m.group(2)),
                            description=line[m.end():].strip()[:60] or "building")
    log.flush()
    return proc.wait()


def _last_error(log_path: Path) -> str:
    lines = log_path.read_text(errors="replace").splitlines()
    for line in lines:
        if "error" in line.lower() and ("error:" in line or "Error" in line):
            return line.strip()[:200]
    return (lines[-1].strip()[:200] if lines else "no output")


def _check_targets(targets: Sequence[str] | None, tests: bool) -> tuple[str, ...]:
    """The targets to build: all of the build's (default) or a subset of them."""
    allowed = _targets(tests)
    if targets is None:
        return allowed
    unknown = [t for t in targets if t not in allowed]
    if unknown or not targets:
        extra = " (test targets need tests=True)" if any(t in TEST_TARGETS for t in unknown) else ""
        raise UserError(f"unknown llama.cpp build target(s) {', '.join(unknown) or '(none)'}{extra}; "
                        f"choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(targets))


def bin_dir(cuda: bool = False, tests: bool = False, prefix: Path | None = None) -> Path:
    """Where build() with these options puts the binaries (whether or not they exist yet)."""
    return _build_root(cuda, prefix, tests) / "build" / "bin"


def source_dir(cuda: bool = False, tests: bool = False, prefix: Path | None = None) -> Path:
    """The patched source tree that build() with these options compiles (prepared on first use;
    a tree placed here with PATCHED_STAMP in it is taken as prepared)."""
    return _build_root(cuda, prefix, tests) / "src"


def built(cuda: bool = False, tests: bool = False, targets: Sequence[str] | None = None,
          prefix: Path | None = None) -> Path | None:
    """The bin folder of a finished build with these options and targets, or None; never builds
    (for callers that must not start a long build, e.g. bench/gpu_check.py --dry-run)."""
    p = plan(cuda, prefix, tests, targets)
    return p.bin_dir if p.built else None


def build_commands(cuda: bool = False, jobs: int | None = None, prefix: Path | None = None, tests: bool = False,
                   targets: Sequence[str] | None = None) -> list[list[str]]:
    """The cmake configure and build command lines that build() runs for these options (the
    source tree is <build root>/src, prepared first; CUDAARCHS in the environment picks the CUDA
    architectures). Raises UserError on an unknown target."""
    return _commands(plan(cuda, prefix, tests, targets), jobs)


def _commands(p: BuildPlan, jobs: int | None) -> list[list[str]]:
    build_dir = p.root / "build"
    cfg = ["cmake", "-S", str(p.root / "src"), "-B", str(build_dir),
           *cmake_options(p.cuda, p.tests, shutil.which("ccache") is not None)]
    if shutil.which("ninja"):
        cfg += ["-G", "Ninja"]
    jobs = jobs or os.cpu_count() or 2
    return [cfg, ["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *p.targets]]


@contextlib.contextmanager
def _progress(console, what: str):
    """A rich progress bar on console (None: no bar) yielding (progress, task) for _run_logged."""
    if console is None:
        yield None, None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[bold]building[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)
    with progress:
        yield progress, progress.add_task(what, total=None)


def _build_env(root: Path) -> tuple[dict, bool]:
    env = dict(os.environ)
    ccache = shutil.which("ccache") is not None
    if ccache:
        # relative paths below root make cache entries shareable between build roots
        env.setdefault("CCACHE_BASEDIR", str(root))
        env.setdefault("CCACHE_NOHASHDIR", "true")
    return env, ccache


def _need_tools(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise UserError(f"{tool} is required to build llama.cpp but was not found on PATH")


def build(cuda: bool = False, jobs: int | None = None, prefix: Path | None = None, console=None,
          tests: bool = False, targets: Sequence[str] | None = None) -> Path:
    """Build (or find cached) patched llama.cpp and return the folder of its binaries.

    cuda: configure with GGML_CUDA=ON (needs the CUDA toolkit with cuBLAS). jobs: parallel
    compile jobs (default: CPU count). prefix: folder under which builds are kept (default
    ~/.cache/asvd2gguf/llama.cpp). console: a rich Console for progress, or None for silence.
    tests: build TOOLS + TEST_TARGETS (LLAMA_BUILD_TESTS=ON) instead of TARGETS; a separate
    build root and key, so the default build stays lean (with ccache the test build recompiles
    little). targets: build only these of the build's targets (default all; e.g. a CUDA check
    that needs four tools); a later call asking for more builds the rest in the same folder, as
    does a root built before TARGETS grew (e.g. without the server). The full build output goes
    to <build root>/build.log. Raises UserError on an unknown target or a failed configure/build.
    """
    p = plan(cuda, prefix, tests, targets)
    if p.built:
        return p.bin_dir
    with _locked(p.root):
        if plan(cuda, prefix, tests, targets).built:
            return p.bin_dir  # built by another process while this one waited
        return _build_locked(p, jobs, console)


def _build_locked(p: BuildPlan, jobs: int | None, console) -> Path:
    _need_tools("cmake", "git")
    t0 = time.time()
    root = p.root
    _prepare_source(root, console)
    build_dir = root / "build"
    log_path = root / "build.log"
    env, _ = _build_env(root)
    cfg, cmd = _commands(p, jobs)
    with open(log_path, "a") as log:
        _say(console, f"[bold]configuring[/] {'CUDA' if p.cuda else 'CPU'} build in {build_dir} (log: {log_path})")
        if _run_logged(cfg, log, env) != 0:
            raise UserError(f"cmake configure failed ({_last_error(log_path)}); see {log_path}")
        with _progress(console, "llama.cpp") as (progress, task):
            rc = _run_logged(cmd, log, env, progress=progress, task=task)
        if rc != 0:
            raise UserError(f"llama.cpp build failed ({_last_error(log_path)}); see {log_path}")
    missing = [t for t in p.targets if not (p.bin_dir / t).is_file()]
    if missing:
        raise UserError(f"build finished but {', '.join(missing)} is missing; see {log_path}")
    (root / _STAMP).write_text(json.dumps({"key": p.key, "seconds": round(time.time() - t0, 1),
                                           "targets": list(p.targets)}))
    _say(console, f"built in {time.time() - t0:.0f} s")
    return p.bin_dir


def binary(name: str) -> Path:
    """Path of one patched tool (building the CPU variant first if needed; a TEST_TARGETS name
    comes from the tests=True build)."""
    if name in TEST_TARGETS:
        return build(tests=True) / name
    if name not in TARGETS:
        raise UserError(f"unknown llama.cpp tool {name!r}; built tools: {', '.join(TARGETS + TEST_TARGETS)}")
    return build() / name


# ---------------------------------------------------------------- llama-cpp-python

# the wheel's build: the sdist's own CMakeLists (LLAMA_BUILD_COMMON is forced on there), RPC on as
# in the binaries, no multimodal library (llama_cpp imports it only for image chat handlers)
WHEEL_CMAKE_ARGS = ("-DLLAVA_BUILD=OFF", "-DGGML_RPC=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF")


def _cached_wheel(root: Path) -> Path | None:
    wheels = sorted((root / "python" / "dist").glob("llama_cpp_python-*.whl"))
    return wheels[-1] if wheels and (root / "python" / _STAMP).is_file() else None


def _prepare_python(root: Path, console) -> Path:
    """The llama-cpp-python sdist unpacked under root/python/src, its vendor/llama.cpp replaced by
    a link to this build's patched tree (root/src): the very files the binaries compile."""
    src = _prepare_source(root, console)
    py = root / "python" / "src"
    stamp = py / ".asvd2gguf-unpacked"
    if stamp.is_file():
        return py
    if py.exists():
        shutil.rmtree(py)
    py.parent.mkdir(parents=True, exist_ok=True)
    prefix = SDIST.removesuffix(".tar.gz") + "/"
    vendor = prefix + "vendor/llama.cpp/"
    with atomic_dir(py) as tmp, tarfile.open(sdist_path()) as tf:
        members = []
        for m in tf.getmembers():
            if m.name.startswith(prefix) and not m.name.startswith(vendor) and m.name != vendor.rstrip("/") \
                    and not m.name.startswith(prefix + ".git/"):
                m.name = m.name[len(prefix):]
                if m.name:
                    members.append(m)
        tf.extractall(tmp, members=members, filter="data")
        (tmp / "vendor").mkdir(exist_ok=True)
        # relative to py/vendor once renamed (tmp is py's sibling, so the same path)
        (tmp / "vendor" / "llama.cpp").symlink_to(os.path.relpath(src, tmp / "vendor"))
    stamp.write_text(SDIST_SHA256)
    return py


def build_python(jobs: int | None = None, prefix: Path | None = None, console=None) -> Path:
    """Build (or find cached) a llama-cpp-python 0.3.36 wheel of the patched tree; return its path.

    The wheel is the PyPI sdist built by its own build backend (scikit-build-core, fetched by pip
    into an isolated build environment) with vendor/llama.cpp being this build's patched tree
    (same patches/series, same ggml_ops/, so the same key); CPU only. It is kept under
    <build root>/python/dist, so a second call returns at once. Output: <root>/python/build.log.
    Raises UserError when pip, cmake or a compiler fails (naming the first error line).
    """
    p = plan(False, prefix, False)
    if p.wheel is not None:
        return p.wheel
    with _locked(p.root):
        cached = _cached_wheel(p.root)
        if cached is not None:
            return cached
        _need_tools("cmake", "git")
        t0 = time.time()
        py = _prepare_python(p.root, console)
        out = p.root / "python"
        dist = out / "dist"
        shutil.rmtree(dist, ignore_errors=True)
        env, ccache = _build_env(p.root)
        env["CMAKE_ARGS"] = " ".join((*WHEEL_CMAKE_ARGS, f"-DGGML_CCACHE={'ON' if ccache else 'OFF'}"))
        env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs or os.cpu_count() or 2)
        # a fixed build folder: a rebuild after a patch edit is incremental (a new key: a new root)
        cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(dist), str(py),
               f"--config-settings=build-dir={out / 'build'}"]
        log_path = out / "build.log"
        _say(console, f"[bold]building[/] the llama-cpp-python wheel in {out} (log: {log_path})")
        with open(log_path, "a") as log, _progress(console, "llama-cpp-python") as (progress, task):
            rc = _run_logged(cmd, log, env, progress=progress, task=task)
        wheels = sorted(dist.glob("llama_cpp_python-*.whl"))
        if rc != 0 or not wheels:
            raise UserError(f"llama-cpp-python wheel build failed ({_last_error(log_path)}); see {log_path}")
        (out / _STAMP).write_text(json.dumps({"key": p.key, "seconds": round(time.time() - t0, 1)}))
        _say(console, f"built in {time.time() - t0:.0f} s")
        return wheels[-1]


def _run_tool(cmd: list[str], env: dict | None = None) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env)
    out = res.stdout + res.stderr
    if res.returncode != 0:
        lines = [ln for ln in out.splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if "error" in ln.lower() or "failed" in ln.lower()),
                   lines[-1] if lines else "")
        raise UserError(f"{Path(cmd[0]).name} failed (exit {res.returncode}): {err.strip()[:300]}")
    return out


_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"


# (pattern, result keys, scale): later patterns win, so KLD runs report their Mean PPL(Q)
_PPL_PATTERNS = (
    (r"Final estimate: PPL = " + _NUM + r" \+/- " + _NUM, ("ppl", "ppl_err"), 1.0),
    (r"Mean PPL\(Q\)\s*:\s*" + _NUM + r"\s*±\s*" + _NUM, ("ppl", "ppl_err"), 1.0),
    (r"Mean PPL\(base\)\s*:\s*" + _NUM, ("ppl_base",), 1.0),
    (r"Mean\s+KLD:\s*" + _NUM + r"\s*±\s*" + _NUM, ("kld", "kld_err"), 1.0),
    (r"Maximum KLD:\s*" + _NUM, ("kld_max",), 1.0),
    (r"Same top p:\s*" + _NUM, ("same_top_p",), 0.01),
)


def parse_perplexity(out: str) -> dict:
    """Numbers from llama-perplexity output: final PPL (+/-), KLD statistics, KV cache size."""
    res: dict = {}
    for pattern, keys, scale in _PPL_PATTERNS:
        m = re.search(pattern, out)
        if m:
            # round: the printed digits / 100 without binary noise (0.94412, not 0.9441200000000001)
            res.update({k: round(float(m.group(i + 1)) * scale, 12) for i, k in enumerate(keys)})
    m = re.search(r"calculating perplexity over (\d+) chunks", out)
    if m:
        res["chunks"] = int(m.group(1))
    kv = [float(x) for x in re.findall(r"llama_kv_cache: size = \s*" + _NUM + r" MiB", out)]
    if kv:
        res["kv_mib"] = sum(kv)
    return res


def kv_cache_mib(model: Path, ctx: int = 8192, env: dict | None = None, extra: Sequence[str] = (),
                 threads: int = 2, bins: Path | None = None) -> float:
    """KV cache MiB that llama.cpp allocates for `model` at n_ctx `ctx` (one sequence), as its own
    log reports it (llama-completion generating one token, -lv 4). `env` e.g. {"ASVD_LATENT_KV": "0"}
    for the dense cache of a latent file; `extra` e.g. ["-ctk", "q8_0"]. Raises UserError when the
    tool fails or logs no size."""
    exe = Path(bins) / "llama-completion" if bins else binary("llama-completion")
    cmd = [str(exe), "-m", str(model), "-c", str(ctx), "-n", "1", "-p", "Hello", "-no-cnv", "-t", str(threads),
           "--no-warmup", "-lv", "4", *extra]
    res = parse_perplexity(_run_tool(cmd, env=dict(os.environ, **(env or {}))))
    if "kv_mib" not in res:
        raise UserError(f"llama-completion logged no KV cache size for {Path(model).name}")
    return res["kv_mib"]


def _check_same_vocab(model: Path, base: Path) -> None:
    """KL divergence compares two distributions over one vocabulary: refuse a base whose tokenizer
    differs (llama-perplexity aborts on it with a token id out of range, or compares unrelated
    tokens when the sizes happen to match). Raises UserError naming both files."""
    from .gguf_fast import FastGGUFReader

    def vocab(path: Path) -> tuple:
        f = FastGGUFReader(path, stop_after="tokenizer.ggml.tokens").fields
        tokens = f["tokenizer.ggml.tokens"].contents() if "tokenizer.ggml.tokens" in f else []
        model_kind = f["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in f else None
        return model_kind, len(tokens), hashlib.sha256("\0".join(tokens).encode()).hexdigest()

    (mk, mn, mh), (bk, bn, bh) = vocab(model), vocab(base)
    if mh != bh:
        raise UserError(f"{base.name} is not a base for {model.name}: their tokenizers differ ({bk}, {bn} tokens "
                        f"against {mk}, {mn}); KL divergence needs the same vocabulary")


def _kl_base_logits(exe: Path, base: Path, text: Path, ctx: int, chunks: int | None, threads: int,
                    extra: Iterable[str]) -> Path:
    """Base-model logits for --kl-divergence, computed once and cached by their inputs."""
    st = base.stat()
    key = hashlib.sha256(json.dumps([str(base.resolve()), st.st_size, st.st_mtime_ns, str(Path(text).resolve()),
                                     ctx, chunks, list(extra)]).encode()).hexdigest()[:20]
    out = cache_root() / "kld" / f"{base.stem}-{key}.kld"
    if out.is_file():
        return out
    cmd = [str(exe), "-m", str(base), "-f", str(text), "-c", str(ctx), "-t", str(threads)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    cmd += list(extra)
    write_atomic(out, lambda tmp: _run_tool(cmd + ["--kl-divergence-base", str(tmp)]))
    return out


def perplexity(model: Path, text: Path, ctx: int = 512, chunks: int | None = None, threads: int = 2,
               extra: Sequence[str] = (), kl_base: Path | None = None, env: dict | None = None,
               bins: Path | None = None) -> dict:
    """Run the patched llama-perplexity on `model` over `text` and return its numbers.

    Returns {"ppl", "ppl_err", "chunks", "kv_mib"} and, with kl_base, also {"kld", "kld_err",
    "kld_max", "same_top_p", "ppl_base"}. kl_base is either a base model (.gguf: its logits are
    computed once with --kl-divergence-base and cached) or an existing logits file. `extra` is
    passed through (e.g. ["-fa", "on", "-ctk", "q8_0"]); `env` overrides the environment (e.g.
    {"ASVD_LATENT_KV": "0"} for an A/B run of the latent cache); `bins` is the bin folder of a
    fixed build to use instead of the current patches' build.
    """
    model, text = Path(model), Path(text)
    for p, what in ((model, "model file"), (text, "text file")):
        require_file(p, what)
    if ctx < 1 or (chunks is not None and chunks < 1):
        # llama-perplexity takes a missing --chunks as "the whole file": 0 must not mean that
        raise UserError(f"ctx and chunks must be at least 1 (got ctx {ctx}, chunks {chunks})")
    base_is_gguf = kl_base is not None and _check_kl_base(model, require_file(kl_base, "base file"))
    exe = Path(bins) / "llama-perplexity" if bins else binary("llama-perplexity")
    cmd = [str(exe), "-m", str(model), "-f", str(text), "-c", str(ctx), "-t", str(threads)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    if kl_base is not None:
        kl_base = Path(kl_base)
        logits = kl_base
        if base_is_gguf:
            logits = _kl_base_logits(exe, kl_base, text, ctx, chunks, threads, extra)
        cmd += ["--kl-divergence-base", str(logits), "--kl-divergence"]
    cmd += list(extra)
    full_env = dict(os.environ, **(env or {}))
    out = _run_tool(cmd, env=full_env)
    res = parse_perplexity(out)
    missing = [k for k in ("ppl",) + (("kld",) if kl_base is not None else ()) if k not in res]
    if missing:
        raise UserError(f"llama-perplexity on {model.name} printed no {' or '.join(missing)} summary; "
                        f"{_what_was_found(out, res)}")
    return res


LOGITS_MAGIC = b"_logits_"  # the first bytes of llama-perplexity's --kl-divergence-base file (perplexity.cpp)


def _check_kl_base(model: Path, base: Path) -> bool:
    """Whether the KLD base is a GGUF (by its magic, whatever its name), after checking it is one of
    the same vocabulary as `model` or a logits file llama-perplexity wrote; UserError naming the
    base otherwise (llama-perplexity's own complaint blamed the model)."""
    with open(base, "rb") as f:
        head = f.read(8)
    if head[:4] == b"GGUF":
        _check_same_vocab(model, base)
        return True
    if head != LOGITS_MAGIC:
        raise UserError(f"base file {base} is neither a GGUF nor a logits file of llama-perplexity "
                        "--kl-divergence-base")
    return False


def _what_was_found(out: str, res: dict) -> str:
    """One line on a llama-perplexity output whose summary is missing: how far the chunks got and
    how the output ends, so a truncated run is told apart from a wrong invocation."""
    chunks = re.findall(r"\[(\d+)\]\s*" + _NUM, out)
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    done = f"{len(chunks)} chunk values" + (f" of {res['chunks']}" if "chunks" in res else "")
    last = lines[-1][:160] if lines else "(no output)"
    return f"found {done}; last line: {last!r}"
