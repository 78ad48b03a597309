"""A real install: the wheel of this checkout, installed into a fresh virtual environment, runs
`convert` and finds the patch series and ggml_ops/ sources for `build-llama` (--dry-run) without
the checkout.

The venv sees the system site-packages, so torch and the other dependencies come from the
existing install (pip resolves them offline with --no-index: nothing is downloaded) while
asvd2gguf itself is the wheel's copy. Every command runs from a folder outside the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import ROOT

from asvd2gguf import llamacpp


def _run(cmd: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}: {res.stdout[-2000:]}{res.stderr[-2000:]}"
    return res


def _source_copy(dest: Path) -> Path:
    """What a source release holds, copied out of the checkout: building in place would leave
    build/ and *.egg-info in the working tree."""
    for name in ("pyproject.toml", "README.md"):
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    for name in ("asvd2gguf", "patches", "ggml_ops"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.fixture(scope="module")
def installed(module_tmp) -> tuple[Path, Path]:
    """(venv bin folder, a work folder outside the checkout) with this checkout's wheel installed."""
    root = module_tmp("install")
    dist = root / "dist"
    # --no-build-isolation: the build backend (setuptools) from the running environment, offline
    src = _source_copy(root / "src")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, src], root)
    wheels = list(dist.glob("asvd2gguf-*.whl"))
    assert len(wheels) == 1
    env_dir = root / "venv"
    # no pip of its own: ensurepip's older setuptools would shadow the one torch requires; the
    # system pip, run by the venv's python, installs into the venv
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    bin_dir = env_dir / "bin"
    _run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-index", wheels[0]], root)
    work = root / "work"
    work.mkdir()
    return bin_dir, work


def test_wheel_is_imported_not_the_checkout(installed):
    bin_dir, work = installed
    out = _run([bin_dir / "python", "-c", "import asvd2gguf, json; from asvd2gguf import llamacpp as l; "
                "print(json.dumps([asvd2gguf.__file__, str(l.PATCH_DIR), str(l.OPS_DIR), l.build_key()]))"], work)
    module, patches, ops, key = json.loads(out.stdout)
    site = str(bin_dir.parent)
    assert module.startswith(site) and patches.startswith(site) and ops.startswith(site)
    # the same files as the checkout's patches/ and ggml_ops/: the same build key
    assert key == llamacpp.build_key()
    names = sorted(p.name for p in Path(patches).iterdir())
    assert names == sorted(p.name for p in (ROOT / "patches").iterdir())


def test_build_llama_dry_run(installed):
    bin_dir, work = installed
    out = _run([bin_dir / "asvd2gguf", "build-llama", "--dry-run"], work).stdout
    site = str(bin_dir.parent)
    for patch in llamacpp._series():
        assert f"  {patch.name}\n" in out
    assert f"patches ({site}" in out and f"ggml_ops ({site}" in out
    assert "ggml-cpu/ggml-cpu-lowrank.c -> ggml/src/ggml-cpu/" in out
    assert f"key {llamacpp.build_key()}" in out and "llama-server llama-cli ggml-rpc-server" in out
    assert out.strip().splitlines()[-1] == str(llamacpp.plan().bin_dir)
    py = _run([bin_dir / "asvd2gguf", "build-llama", "--dry-run", "--python"], work).stdout
    assert "CMAKE_ARGS=" in py and "wheel: llama-cpp-python 0.3.36" in py


def test_convert_tiny_model(installed, tiny_models, calib_text, tmp_path):
    bin_dir, work = installed
    out = tmp_path / "tiny.gguf"
    res = _run([bin_dir / "asvd2gguf", "convert", tiny_models["llama"], "--ratio", "0.75", "--calib", calib_text,
                "--calib-samples", "4", "--calib-seqlen", "64", "--out", out, "--cache-dir", tmp_path / "cache",
                "--device", "cpu"], work)
    assert f"wrote {out}" in res.stdout
    info = _run([bin_dir / "asvd2gguf", "inspect", out], work).stdout
    assert "block-linear ratio (from tensors) = 0.7" in info


def test_build_llama_python_refuses_cuda_and_tests(capsys):
    from clitools import run_cli

    for flag in ("--cuda", "--tests"):
        code, _, err = run_cli(["build-llama", "--python", flag], capsys)
        assert code == 1 and "error:" in err and "--python builds the CPU wheel alone" in err
        assert len(err.strip().splitlines()) == 1


def test_sdist_wheel_ships_the_same_files(tmp_path):
    """The route of a source release (sdist, then a wheel built from it) ships every file of
    patches/ and ggml_ops/ too, byte for byte."""
    import tarfile
    import zipfile

    sdist_dir, wheel_dir = tmp_path / "sdist", tmp_path / "wheel"
    src = _source_copy(tmp_path / "src")
    _run([sys.executable, "-c", f"from setuptools import build_meta as b; b.build_sdist({str(sdist_dir)!r})"], src)
    sdists = list(sdist_dir.glob("asvd2gguf-*.tar.gz"))
    assert len(sdists) == 1
    with tarfile.open(sdists[0]) as tf:
        names = tf.getnames()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheel_dir, sdists[0]],
         tmp_path)
    with zipfile.ZipFile(next(wheel_dir.glob("asvd2gguf-*.whl"))) as zf:
        shipped = {n: zf.read(n) for n in zf.namelist() if n.startswith(("asvd2gguf/patches/", "asvd2gguf/ggml_ops/"))}
    for folder in ("patches", "ggml_ops"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file():
                rel = path.relative_to(ROOT).as_posix()
                assert any(n.endswith("/" + rel) for n in names), rel
                assert shipped[f"asvd2gguf/{rel}"] == path.read_bytes(), rel
