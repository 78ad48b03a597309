"""bench/gpu_check.py without a GPU: arguments, the parsers, the GGUF comparison, the table and
exit code, and the dry run (every GPU command listed; the CPU ones run on the CPU build)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_fixtures as fx  # noqa: E402
from gguf_fixtures import finish_gguf

from asvd2gguf import llamacpp  # noqa: E402
from asvd2gguf.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc  # dataclasses look their module up there
_spec.loader.exec_module(gc)


# ---------------------------------------------------------------- arguments and parsers


def test_arch_from_nvidia_smi():
    gpus = gc.parse_gpus("NVIDIA H200, 9.0, 580.159.03, 143771 MiB\n")
    assert gpus == [{"name": "NVIDIA H200", "compute_cap": "9.0", "driver": "580.159.03", "memory": "143771 MiB"}]
    assert gc.cuda_archs(gpus) == "90-real"
    # one compute_cap column, several GPUs, repeated: each architecture once, in order
    assert gc.cuda_archs(gc.parse_gpus("9.0\n8.6\n9.0\n")) == "86-real;90-real"
    assert gc.cuda_archs(gc.parse_gpus("NVIDIA B200, 10.0, 590.1, 183359 MiB")) == "100-real"
    with pytest.raises(UserError, match="no compute capability"):
        gc.parse_gpus("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n")


def test_arguments(capsys):
    a = gc.parse_args(["--steps", "ppl,compare", "--arch", "90", "--out", "o"])
    assert a.steps == ["env", "compare", "ppl"]  # plan order; env always (it sets the architecture)
    assert a.out == Path("o") and a.chunks == 20 and a.ctx == 512 and a.time_limit == gc.TIME_LIMIT_S
    for bad, msg in ((["--steps", "gpu"], "unknown step(s) gpu"), (["--arch", "9.0"], "--arch must be"),
                     (["--chunks", "0"], "--chunks must be")):
        with pytest.raises(SystemExit) as e:
            gc.parse_args(bad)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


def test_peak_wrapper_passes_the_cli_exit_code(tmp_path, capsys):
    """`gpu_check.py peak -- ARGS` runs the asvd2gguf CLI in-process (GPU conversions print their peak memory)."""
    assert gc.peak_main(["--", "inspect", str(tmp_path / "missing.gguf")]) == 1
    assert "GGUF file not found" in capsys.readouterr().err


def test_kept_layers_are_the_first_and_last():
    assert gc.keep_layers(30, 16) == [*range(8), *range(22, 30)]
    assert gc.keep_layers(30, 3) == [0, 1, 29] and gc.keep_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(UserError, match="--layers must be in 1..30"):
        gc.keep_layers(30, 31)


def test_budgets_fit_eight_minutes():
    b = gc.BUDGET_S
    critical = b["env"] + max(b["build"], b["convert"] + b["compare"]) + b["backend-ops"] + b["ppl"] + b["bench"]
    assert set(b) == set(gc.STEPS) and critical <= 480 and gc.TIME_LIMIT_S <= 480


def test_parse_backend_ops_output():
    out = ("Testing 2 devices\n\nBackend 1/2: CUDA0\n  Device description: NVIDIA H200\n"
           "  Device memory: 143771 MB (142000 MB free)\n\n"
           "  LOWRANK_ATTN(type_k=f16,n_kv=256): \x1b[1;32mOK\x1b[0m\n"
           "  CPY(type_src=f32,type_dst=nf4,ne=[256,4,4,4]): not supported [CUDA0]\n"
           "  LOWRANK_ATTN(type_k=q8_0,n_kv=4096): \x1b[1;31mFAIL\x1b[0m\n"
           "  1/2 tests passed\n  Backend CUDA0: \x1b[1;31mFAIL\x1b[0m\n"
           "Backend 2/2: CPU\n  Skipping CPU backend\n1/2 backends passed\n\x1b[1;31mFAIL\x1b[0m\n")
    assert gc.parse_backend_ops(out) == {"CUDA0": {"passed": 1, "total": 2, "not_supported": 1, "status": "FAIL",
                                                   "failed": ["LOWRANK_ATTN(type_k=q8_0,n_kv=4096)"]}}


def test_parse_bench_and_convert_lines():
    rows = [{"n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ts": 20011.37},
            {"n_prompt": 0, "n_gen": 128, "n_depth": 4096, "avg_ts": 301.04}]
    assert gc.parse_bench("build: x\n" + json.dumps(rows)) == {"pp512@d0": 20011.4, "tg128@d4096": 301.0}
    assert gc.parse_bench("error: failed to load model") == {}
    out = ("block-linear ratio 0.9012, KV ratio 0.5000, calibration perplexity 12.345 -> 14.5, 35.2 s\n"
           "wrote x.gguf\ngpu_check: peak GPU memory 812.4 MiB\n")
    assert gc.parse_convert(out) == {"ratio": 0.9012, "kv": 0.5, "calib_ppl": 14.5, "pipeline_s": 35.2,
                                     "peak_gpu_mib": 812.4}
    wrapped = "block-linear ratio 1.0000, KV ratio 1.0000, calibration perplexity \n1214.7 -> 1214.7, 422.3 s\n"
    assert gc.parse_convert(wrapped)["pipeline_s"] == 422.3  # rich wraps at the terminal width
    assert gc.parse_kv_mib("llama_kv_cache: size =   96.00 MiB (8192 cells)\n") == 96.0


def test_find_cublas_wheel_layout(tmp_path):
    """A toolkit without cuBLAS: the wheel's headers and libraries are handed to cmake and the binaries."""
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.touch()
    root = tmp_path / "site" / "nvidia"
    assert gc.find_cublas(str(nvcc), [root], tmp_path / "links") == ("not found", {})
    (root / "cu13" / "include").mkdir(parents=True)
    (root / "cu13" / "lib").mkdir()
    (root / "cu13" / "include" / "cublas_v2.h").touch()
    for n in ("libcublas.so.13", "libcublasLt.so.13"):
        (root / "cu13" / "lib" / n).touch()
    where, env = gc.find_cublas(str(nvcc), [root], tmp_path / "links")
    assert where.startswith("nvidia-cublas wheel")
    assert env["CPATH"].split(":")[0] == str(root / "cu13" / "include")
    assert (tmp_path / "links" / "libcublas.so").resolve() == root / "cu13" / "lib" / "libcublas.so.13"
    assert env["LD_LIBRARY_PATH"].split(":")[0] == str(root / "cu13" / "lib")
    (tmp_path / "cuda" / "include").mkdir()
    (tmp_path / "cuda" / "include" / "cublas_v2.h").touch()
    assert gc.find_cublas(str(nvcc), [root], tmp_path / "links")[1] == {}  # the toolkit's own wins


def test_overlay_is_the_patch_series_without_git(tmp_path):
    """A host without git gets the patched tree from the pristine one and the carried overlay."""
    pristine, patched = tmp_path / "pristine", tmp_path / "patched"
    for root, b in ((pristine, "2"), (patched, "2 patched")):
        (root / "sub").mkdir(parents=True)
        (root / "a.txt").write_text("1")
        (root / "sub" / "b.txt").write_text(b)
    (pristine / ".git").write_text("gitdir: elsewhere")
    (patched / "sub" / "new.c").write_text("added by a patch")
    (patched / llamacpp.PATCHED_STAMP).write_text("[]")
    overlay = tmp_path / "overlay.tar.xz"
    assert gc.make_overlay(patched, pristine, overlay, "h1") == 2
    src = tmp_path / "build" / "src"
    src.parent.mkdir()
    assert gc.apply_overlay(overlay, pristine, src, "h1") == 2
    assert (src / "a.txt").read_text() == "1" and (src / "sub" / "b.txt").read_text() == "2 patched"
    assert (src / "sub" / "new.c").is_file() and (src / llamacpp.PATCHED_STAMP).is_file()
    assert not (src / ".git").exists()
    with pytest.raises(UserError, match="made from other patches"):
        gc.apply_overlay(overlay, pristine, tmp_path / "build" / "src2", "h2")
    assert len(gc.patch_hash()) == 64


# ---------------------------------------------------------------- GGUF comparison


def _write(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A minimal one-block llama GGUF (no tokenizer: the comparison reads tensors and ranks only)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    for name, arr in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(arr))
    finish_gguf(w)
    return path


def _tensors(ranks: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Every block linear of layer 0 as an SVD factor pair (rank 32 of 64 unless `ranks` says)."""
    rng = np.random.default_rng(seed)
    t = {"token_embd.weight": rng.standard_normal((100, 64)).astype(np.float32),
         "blk.0.attn_norm.weight": np.ones(64, np.float32)}
    for base in fx.LINEARS:
        a, b = fx.svd_factors(rng.standard_normal((64, 64)), (ranks or {}).get(base, 32))
        t[f"blk.0.{base}.lr_in.weight"] = b.astype(np.float32)
        t[f"blk.0.{base}.lr_out.weight"] = a.astype(np.float32)
    return t


def test_compare_ignores_component_signs(tmp_path):
    t = _tensors()
    a = _write(tmp_path / "a.gguf", t)
    for k in [k for k in t if k.endswith(".lr_in.weight")]:  # what another eigensolver may return
        t[k][::2] *= -1
        t[k.replace("lr_in", "lr_out")][:, ::2] *= -1
    r = gc.compare_ggufs(a, _write(tmp_path / "flipped.gguf", t))
    assert r["ranks_equal"] and r["pairs"] == 7 and r["other"] == r["other_equal"] == 2
    assert r["factor_err"] < 1e-6 and r["product_err"] < 1e-6
    same = gc.compare_ggufs(a, a)
    assert same["factor_err"] == 0 and same["product_err"] == 0


def test_compare_finds_differences(tmp_path):
    t = _tensors()
    a = _write(tmp_path / "a.gguf", t)
    t["blk.0.ffn_up.lr_out.weight"] = t["blk.0.ffn_up.lr_out.weight"] * np.float32(1.05)
    t["blk.0.attn_norm.weight"] = t["blk.0.attn_norm.weight"] + np.float32(1e-3)
    r = gc.compare_ggufs(a, _write(tmp_path / "b.gguf", t))
    assert r["product_worst"] == "blk.0.ffn_up" and 0.04 < r["product_err"] < 0.06
    assert r["factor_worst"] == "blk.0.ffn_up" and r["other_unequal"] == ["blk.0.attn_norm.weight"]
    r = gc.compare_ggufs(a, _write(tmp_path / "c.gguf", _tensors({"attn_q": 64})))
    assert not r["ranks_equal"] and "blk.0.attn_q.lr_in.weight" in r["type_or_shape"]


def test_reencode_same_floats_same_bytes(tmp_path):
    a = _write(tmp_path / "a.gguf", _tensors())
    assert gc.reencode_equal(a, "cpu") == {"q8_0": (14, 14), "nf4": (14, 14)}


# ---------------------------------------------------------------- the run: table, exit code, dry run


def _argv(tmp_path, *extra) -> list[str]:
    return ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *extra]


def test_convert_commands(tmp_path):
    """The CPU conversions run in a dry run; the GPU ones go through `peak` (peak memory) with --device cuda."""
    run = gc.Run(gc.parse_args(_argv(tmp_path, "--threads", "16", "--model", "m.gguf")))
    cpu = gc._convert_cmd(run, "cpu", "kv0.5", "m.gguf", gc.SMOL_VARIANTS["kv0.5"], False)
    gpu = gc._convert_cmd(run, "cuda", "kv0.5-nf4", "m.gguf", gc.SMOL_VARIANTS["kv0.5-nf4"], False)
    mapped = gc._convert_cmd(run, "cuda", "tiny-llama-map", "tiny", gc.TINY_OPTS, True, ["--device-map", "map.json"])
    assert not cpu.gpu and gpu.gpu and mapped.gpu
    line = cpu.line(None)
    assert line.startswith("OMP_NUM_THREADS=4 COLUMNS=200 ") and "--device cpu" in line
    assert "--ratio 0.9 --kv 0.5 --calib" in line and "--calib-samples 8 --calib-seqlen 256 --seed 233" in line
    assert f"--cache-dir {tmp_path / 'work' / 'cache-cpu'} --out {tmp_path / 'work' / 'cpu' / 'kv0.5.gguf'}" in line
    line = gpu.line(None)
    assert "gpu_check.py peak -- convert m.gguf --ratio 0.9 --kv 0.5 --quant nf4" in line
    assert line.endswith("--device cuda") and "cache-cuda" in line
    assert "--device-map map.json" in mapped.line(None) and "--device cuda" not in mapped.line(None)
    assert "--calib-samples 8 --calib-seqlen 128" in mapped.line(None)


def test_failure_exits_nonzero_with_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDAARCHS", "")  # restored afterwards: the run sets it
    code = gc.main(_argv(tmp_path, "--dry-run", "--steps", "env", "--model", str(tmp_path / "missing.gguf")))
    out = capsys.readouterr().out
    assert code == 1
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| env | step | raised UserError: model not found:" in md and "**FAIL**" in md
    assert "0 passed, 1 failed" in md and md in out
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert data["dry_run"] and any(c["ok"] is False for c in data["checks"])
    assert (tmp_path / "out" / "logs.tar.gz").is_file()


def test_real_run_without_gpu_stops_after_env(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDAARCHS", "")
    code = gc.main(_argv(tmp_path, "--arch", "90"))
    out = capsys.readouterr().out
    assert code == 1 and "not a usable CUDA host; stopping" in out
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    torch_row = next(line for line in md.splitlines() if line.startswith("| env | torch |"))
    assert "available: False" in torch_row and torch_row.endswith("**FAIL** |")
    assert "| build |" not in md  # nothing after env ran


@pytest.mark.llama
def test_dry_run_lists_gpu_commands_and_parses_real_cpu_output(tmp_path, monkeypatch, capsys, text_small):
    """ppl/bench/backend-ops of a dry run on tiny factored files: the GPU commands are listed; the
    CPU reference runs, test-backend-ops -b CPU and a small CPU llama-bench run on the CPU build,
    and their real output lands in the table."""
    llamacpp.build()
    llamacpp.build(tests=True)
    work = tmp_path / "work" / "cpu"
    work.mkdir(parents=True)
    dense = fx.write_tiny("llama", tmp_path / "tiny.gguf")
    fx.write_factored(dense, work / "dense.gguf", rank=lambda *_: 0, outtype="f16", dense=True)
    fx.write_factored(dense, work / "kv0.5.gguf", rank=lambda b, il, s: 32, linears=("attn_k", "attn_v"),
                      kv_latent=True, outtype="f16")
    monkeypatch.setenv("CUDAARCHS", "")
    code = gc.main(_argv(tmp_path, "--dry-run", "--steps", "build,backend-ops,ppl,bench", "--text", str(text_small),
                         "--chunks", "2", "--ctx", "128", "--threads", "2"))
    out = capsys.readouterr().out
    assert code == 0, out
    for cmd in ("build-llama --cuda --tests", "CUDAARCHS=90-real", "test-backend-ops test -o LOWRANK_ATTN",
                "test-backend-ops test -o MUL_MAT -p type_a=nf4", "-ngl 99 --kl-divergence-base",
                "ASVD_LATENT_FUSED=0 ", "ASVD_LATENT_V=rebuild ", "-ub 1", "-d 0,4096", "llama-completion"):
        assert cmd in out, cmd
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    lines = md.splitlines()
    # real parsed numbers from CPU runs: the KLD of a run against its own base is zero
    self_row = next(line for line in lines if "dry run: CPU vs its own base" in line)
    assert abs(float(re.search(r"KLD mean (\S+),", self_row).group(1))) < 1e-6 and "same top 100.00%" in self_row
    lowrank = next(line for line in lines if "LOWRANK_ATTN (dry run: CPU vs CPU)" in line)
    passed, total = map(int, re.search(r"CPU: (\d+)/(\d+) passed", lowrank).groups())
    assert passed == total > 0
    assert any("pp32@d0" in line for line in lines)
    assert any("KV cache at n_ctx 8192, kv0.5 (dry run: CPU)" in line and "MiB" in line for line in lines)
    assert "input missing: r0.9.gguf" in md  # not converted here: listed, not a failure in a dry run
