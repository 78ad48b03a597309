"""Bad input: one line on stderr, a non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from clitools import run_cli
from gguf_fixtures import finish_gguf

from asvd2gguf import cache
from asvd2gguf.convert import ConvertConfig, convert
from asvd2gguf.errors import UserError


def _assert_one_line_error(code, err, fragment):
    assert code != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and fragment in " ".join(lines), err
    assert lines[-1].startswith("error:") or "error:" in lines[0]


def _tiny_args(tiny_models, calib_text, cache_dir, out, *extra):
    return ["convert", tiny_models["llama"], "--calib", calib_text, "--calib-samples", "4", "--calib-seqlen", "64",
            "--out", out, "--cache-dir", cache_dir, "--device", "cpu", *extra]


@pytest.mark.parametrize("args,fragment", [
    (["convert", "/nonexistent/model.gguf"], "model file not found"),
    (["convert", "no-such-folder-or-model"], "model not found"),
    (["convert", "smollm2", "--ratio", "0"], "--ratio must be in (0, 1]"),
    (["convert", "smollm2", "--ratio", "1.5"], "--ratio must be in (0, 1]"),
    (["convert", "smollm2", "--ratio", "0.9", "--ppl-target", "30"], "either --ratio or --ppl-target"),
    (["convert", "smollm2", "--kv", "0"], "--kv must be in (0, 1]"),
    (["convert", "smollm2", "--method", "magic"], "unknown --method"),
    (["ppl", "smollm2", "--text", "x.txt", "--ctx", "1"], "--ctx must be at least 2"),  # fail() inside a command
    (["inspect", "/nonexistent.gguf"], "GGUF file not found"),
    (["convert", "smollm2", "--calib-samples", "abc"], "--calib-samples"),  # the parser's own errors: one line
    (["convert", "smollm2", "--no-such-option"], "--no-such-option"),
    (["ppl", "/nonexistent.gguf", "--text", "/nonexistent.txt"], "not found"),
])
def test_argument_errors(args, fragment, capsys):
    code, _, err = run_cli(args, capsys)
    _assert_one_line_error(code, err, fragment)


def test_unsupported_architecture_lists_supported(tmp_path, capsys):
    p = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(p, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    finish_gguf(w)
    code, _, err = run_cli(["convert", str(p)], capsys)
    _assert_one_line_error(code, err, "unsupported architecture 'gpt2'")
    assert "llama" in err and "qwen2" in err and "qwen3" in err


def test_corrupt_gguf(tmp_path, capsys):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + os.urandom(64))
    for cmd in (["convert", str(p)], ["inspect", str(p)]):
        code, _, err = run_cli(cmd, capsys)
        _assert_one_line_error(code, err, str(p.name))


def test_existing_output_needs_force(tiny_models, calib_text, cache_dir, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    code, _, err = run_cli(_tiny_args(tiny_models, calib_text, cache_dir, out), capsys)
    _assert_one_line_error(code, err, "exists; pass --force")
    assert out.read_bytes() == b"precious"
    code, _, err = run_cli(_tiny_args(tiny_models, calib_text, cache_dir, out, "--force"), capsys)
    assert code == 0, err
    assert out.read_bytes()[:4] == b"GGUF"


def test_missing_calibration_file(tiny_models, cache_dir, tmp_path, capsys):
    code, _, err = run_cli(_tiny_args(tiny_models, tmp_path / "none.txt", cache_dir, tmp_path / "o.gguf"), capsys)
    _assert_one_line_error(code, err, "text file not found")


def test_unreachable_targets_name_the_closest(tiny_models, calib_text, cache_dir, tmp_path, capsys):
    code, _, err = run_cli(_tiny_args(tiny_models, calib_text, cache_dir, tmp_path / "o.gguf", "--ratio", "0.01"),
                           capsys)
    _assert_one_line_error(code, err, "smallest reachable block-linear ratio is 0.")
    code, _, err = run_cli(_tiny_args(tiny_models, calib_text, cache_dir, tmp_path / "o.gguf", "--ratio", "1",
                                      "--kv", "0.05"), capsys)
    _assert_one_line_error(code, err, "smallest latent cache is 0.")
    code, _, err = run_cli(_tiny_args(tiny_models, calib_text, cache_dir, tmp_path / "o.gguf", "--ppl-target",
                                      "1.0001"), capsys)
    _assert_one_line_error(code, err, "cannot be met")
    assert not (tmp_path / "o.gguf").exists()


def test_disk_full_leaves_nothing(tiny_models, calib_text, cache_dir, tmp_path, monkeypatch, capsys):
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    code, _, err = run_cli(_tiny_args(tiny_models, calib_text, cache_dir, tmp_path / "o.gguf"), capsys)
    _assert_one_line_error(code, err, "disk full")
    assert list(tmp_path.iterdir()) == []


def test_non_finite_factors_fall_back_to_dense(tiny_models, calib_text, cache_dir, tmp_path, monkeypatch):
    from asvd2gguf.analysis import AnalysisStore

    real = AnalysisStore.factorization

    def poisoned(self, layer, key):
        f = real(self, layer, key)
        if key != "attn_k":
            f.U = f.U.clone()
            f.U[0, 0] = float("nan")
        return f

    monkeypatch.setattr(AnalysisStore, "factorization", poisoned)
    res = convert(ConvertConfig(model=str(tiny_models["llama"]), out=tmp_path / "o.gguf", calib=str(calib_text),
                                calib_samples=4, calib_seqlen=64, cache_dir=cache_dir, ratio=0.6, device="cpu"))
    assert res.fallbacks and not any(f.name.endswith("attn_k") for f in res.fallbacks)
    assert {(f.reason, f.written) for f in res.fallbacks} == {("non-finite factors", "dense")}
    from asvd2gguf.gguf_read import describe_gguf

    info = describe_gguf(tmp_path / "o.gguf")
    for f in res.fallbacks:
        _, layer, key = f.name.split(".", 2)
        assert info.ranks[key][int(layer)] == 0
    assert res.ratio == pytest.approx(info.ratio())
    assert np.isfinite(res.calib_ppl)


def test_sigkill_leaves_no_output_and_resumes(tiny_models, calib_text, tmp_path):
    """Kill -9 during the exact sensitivity sweep; the rerun reuses every finished entry."""
    cache_dir = tmp_path / "cache"
    out = tmp_path / "k.gguf"
    cmd = [sys.executable, "-m", "asvd2gguf.cli", *map(str, _tiny_args(tiny_models, calib_text, cache_dir, out,
           "--sensitivity", "ppl", "--sweep-samples", "4", "--calib-seqlen", "256"))]
    cmd[cmd.index("--calib-seqlen") + 1] = "256"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sens = cache_dir / "sens_ppl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list(sens.glob("*/*.pt"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "convert finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = {p: p.stat().st_mtime_ns for p in sens.glob("*/*.pt")}
    assert done and not list(sens.glob("*/.*tmp*"))
    assert all(cache.load(p) is not None for p in cache_dir.rglob("*.pt"))  # no corrupt entry anywhere
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert out.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # reused, not recomputed
    assert len(list(sens.glob("*/*.pt"))) == 14  # 2 layers x 7 linears
    assert torch.load(next(iter(done)), weights_only=True)
    assert not [p for p in Path(tmp_path).iterdir() if p.name.startswith(".k.gguf.partial")]


def test_non_finite_latent_factors_fall_back_to_the_exact_latent(tiny_models, calib_text, cache_dir, tmp_path,
                                                                 monkeypatch):
    """Under --kv a K/V linear must stay factored: non-finite factors give the exact pair A = I, B = W,
    and the plan (metadata, achieved KV ratio) records its full width, as the tensors say."""
    from asvd2gguf.analysis import AnalysisStore
    from asvd2gguf.gguf_read import describe_gguf

    real = AnalysisStore.factorization

    def poisoned(self, layer, key):
        f = real(self, layer, key)
        if key == "attn_k":
            f.U = f.U.clone()
            f.U[0, 0] = float("nan")
        return f

    monkeypatch.setattr(AnalysisStore, "factorization", poisoned)
    out = tmp_path / "o.gguf"
    res = convert(ConvertConfig(model=str(tiny_models["llama"]), out=out, calib=str(calib_text), calib_samples=4,
                                calib_seqlen=64, cache_dir=cache_dir, ratio=0.8, kv=0.75, device="cpu"))
    assert [(f.name, f.reason, f.written) for f in res.fallbacks] == [
        (f"blk.{i}.attn_k", "non-finite factors", "as the exact full-width latent") for i in range(2)]
    info = describe_gguf(out)
    m = info.shapes["attn_k"][0]
    assert info.ranks["attn_k"] == res.ranks["attn_k"] == info.meta["asvd.rank.attn_k"] == [m, m]
    assert res.kv == pytest.approx(info.kv_ratio()) and res.ratio == pytest.approx(info.ratio())
    assert np.isfinite(res.calib_ppl)


def _small_gguf(path, tokens, arch="llama"):
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_tensor("token_embd.weight", np.arange(len(tokens) * 8, dtype=np.float32).reshape(len(tokens), 8))
    finish_gguf(w)
    return path


def test_truncated_gguf_at_every_part(tmp_path, capsys):
    """A GGUF cut short anywhere (magic, counts, a key, the token array, tensor infos, the data) is
    refused in one line by every command that reads one, and convert writes nothing."""
    whole = _small_gguf(tmp_path / "whole.gguf", [f"tok{i}" for i in range(300)]).read_bytes()
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    for cut in (3, 10, 20, 60, 200, 2000, len(whole) - 100):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(whole[:cut])
        out = tmp_path / f"out{cut}.gguf"
        for cmd in (["convert", p, "--out", out], ["inspect", p]):
            code, _, err = run_cli(cmd, capsys)
            assert code == 1, (cut, cmd[0], err)
            _assert_one_line_error(code, err, p.name)
            assert "internal error" not in err
        assert not out.exists() and not list(tmp_path.glob(f"out{cut}*"))


@pytest.mark.parametrize("args", [["--chunks", "0"], ["--ctx", "0"], ["--chunks", "-1"], ["--threads", "0"]])
def test_eval_counts_must_be_positive(tmp_path, capsys, args):
    """--chunks 0 used to run llama-perplexity over the whole file (a missing --chunks means all)."""
    model = _small_gguf(tmp_path / "m.gguf", ["a", "b"])
    text = tmp_path / "t.txt"
    text.write_text("hello")
    code, _, err = run_cli(["eval", model, "--text", text, *args], capsys)
    _assert_one_line_error(code, err, args[0])


def test_llama_perplexity_refuses_zero_chunks_and_other_vocabularies(tmp_path):
    from asvd2gguf import llamacpp

    model = _small_gguf(tmp_path / "m.gguf", ["a", "b", "c"])
    same = _small_gguf(tmp_path / "same.gguf", ["a", "b", "c"])
    other = _small_gguf(tmp_path / "other.gguf", ["a", "b", "d"])
    text = tmp_path / "t.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match="chunks must be at least 1"):
        llamacpp.perplexity(model, text, chunks=0)
    with pytest.raises(UserError, match="other.gguf is not a base for m.gguf: their tokenizers differ"):
        llamacpp.perplexity(model, text, chunks=1, kl_base=other)
    llamacpp._check_same_vocab(model, same)  # same tokens: accepted
    # a base is told by its bytes, not its name: a GGUF called .bin is still checked as a model
    import shutil

    renamed = tmp_path / "other.bin"
    shutil.copy(other, renamed)
    with pytest.raises(UserError, match="other.bin is not a base for m.gguf"):
        llamacpp.perplexity(model, text, chunks=1, kl_base=renamed)
    logits = tmp_path / "base.kld"
    logits.write_bytes(llamacpp.LOGITS_MAGIC + b"rest")
    assert llamacpp._check_kl_base(model, logits) is False and llamacpp._check_kl_base(model, same) is True


@pytest.mark.parametrize("args,fragment", [
    (["build-llama", "--dry-run", "--target", "nonsense"], "unknown llama.cpp build target"),
    (["build-llama", "--python", "--target", "llama-cli"], "--target picks tools"),
    (["build-llama", "--python", "--dry-run", "--target", "llama-cli"], "--target picks tools"),
])
def test_build_llama_target_checked_everywhere(args, fragment, capsys):
    code, _, err = run_cli(args, capsys)
    _assert_one_line_error(code, err, fragment)


def test_build_llama_dry_run_lists_the_chosen_targets(capsys):
    code, out, err = run_cli(["build-llama", "--dry-run", "--target", "llama-bench"], capsys)
    assert code == 0, err
    assert "targets: llama-bench\n" in out


@pytest.mark.parametrize("args", [["convert", "/nonexistent/model.gguf"], ["inspect", "/nonexistent/model.gguf"],
                                  ["ppl", "/nonexistent/model.gguf", "--text", "/nonexistent/t.txt"]])
def test_error_is_exactly_one_line_on_stderr(args):
    """Run as a user runs it (a process, stderr a pipe): stderr is the error line and nothing else
    (a stopped progress display used to print an empty line above it)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "asvd2gguf.cli", *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, repr(res.stderr)


@pytest.mark.parametrize("cmd", [["inspect", "{d}"], ["convert", "{d}"], ["ppl", "{d}", "--text", "{t}"],
                                 ["eval", "{d}", "--text", "{t}"], ["eval", "{t}", "--text", "{d}"],
                                 ["eval", "{t}", "--text", "{t}", "--base", "{d}"]])
def test_a_folder_given_as_a_file_is_named_so(cmd, tmp_path, capsys):
    """Every input file of every command: a folder (here one named like a GGUF) is said to be one,
    not "not found" (a new user's finding on `inspect DIR`)."""
    d = tmp_path / "model.gguf"
    d.mkdir()
    t = tmp_path / "t.gguf"
    t.write_bytes(b"x")
    code, _, err = run_cli([a.format(d=d, t=t) for a in cmd], capsys)
    _assert_one_line_error(code, err, "is a directory")
