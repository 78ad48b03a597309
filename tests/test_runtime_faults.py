"""Issue 16's llama.cpp-side faults, each as a kind (docs/runtime.md, "Faults fixed as kinds").

- Factor types whose CPU buffers are repacked (IQ4_NL, Q4_0, ...) with the latent cache: A_k and
  A_v must stay in plain buffers (patch 0003), for every type a factor can have.
- llama-imatrix on latent files: A's statistics come from B's output (patch 0007), so they equal
  those of the same file with the cache off.
- llama-perplexity's last lines: the async logger is flushed at exit (patch 0006).
- Saved states that do not fit the cache they are read into: refused with a message, never an
  abort (patch 0003): llama-bench's depth state across models, --prompt-cache session files
  from another model, with the latent cache on/off the other way, cut short, or with altered
  row sizes.
- NF4's type id: 64 now; 43 (files before 2026-11) still read as NF4 only in asvd files.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_fixtures as fx  # noqa: E402
from runtime_tools import complete, kld_base, ppl  # noqa: E402

from asvd2gguf import llamacpp  # noqa: E402
from asvd2gguf.errors import UserError  # noqa: E402
from asvd2gguf.ggml_quants import NF4_ID, NF4_LEGACY_ID  # noqa: E402

pytestmark = pytest.mark.llama


def _quantize(bins: Path, src: Path, dst: Path, ftype: str, *extra: str) -> Path:
    res = subprocess.run([str(bins / "llama-quantize"), *extra, str(src), str(dst), ftype, "2"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-1500:]
    return dst


def _tensor_types(path: Path) -> dict[str, str]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}


# ---------------------------------------------------------------- repacked factor types x latent cache

FACTOR_TYPES = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "IQ4_NL", "IQ4_XS", "NF4")


@pytest.fixture(scope="module")
def latent_typed(bins, module_tmp):
    """A tiny llama latent file (k/v at rank 32, the other linears at rank 64) in every factor type.

    llama-quantize --pure puts the type on every factor its row length allows (Q4_K and IQ4_XS
    need rows of 256: A's rows are r wide, so A falls back there, as llama-quantize decides)."""
    root = module_tmp("typed")
    dense = fx.write_tiny("llama", root / "base.gguf")
    rank = lambda b, il, s: 32 if b in ("attn_k", "attn_v") else 64  # noqa: E731
    f16 = fx.write_factored(dense, root / "kv-F16.gguf", rank=rank, kv_latent=True, outtype="f16")
    files = {"F16": f16}
    for t in FACTOR_TYPES[1:]:
        files[t] = _quantize(bins, f16, root / f"kv-{t}.gguf", t, "--pure")
    return files


def test_factor_types_are_what_the_matrix_says(latent_typed):
    """The matrix below really covers the repacked types: A_v carries them where its rows allow."""
    for t in ("Q4_0", "IQ4_NL", "NF4", "Q8_0", "BF16"):
        assert _tensor_types(latent_typed[t])["blk.0.attn_v.lr_out.weight"] == t, t


@pytest.mark.parametrize("ftype", FACTOR_TYPES)
def test_latent_cache_with_repacked_factors(latent_typed, text_small, tmp_path, ftype):
    """Every factor type, latent cache on and off, flash attention on and off: the default run
    (CPU repacking on) starts and equals --no-repack (KLD < 1e-4). -b 8 decodes through the
    folded V and the fused attention op, which read A_v / A_k through views."""
    model = latent_typed[ftype]
    for latent in ("1", "0"):
        for fa in ("on", "off"):
            env = {"ASVD_LATENT_KV": latent}
            base = kld_base(model, text_small, tmp_path / f"{ftype}-{latent}-{fa}.kld", env, "-fa", fa, "-b", "8",
                            "--no-repack")
            r = ppl(model, text_small, kl_base=base, extra=["-fa", fa, "-b", "8"], env=env)
            assert r["kld"] < 1e-4, (ftype, latent, fa, r)


def test_repacked_latent_file_generates(latent_typed):
    """The issue's input: llama-completion on an IQ4_NL latent file aborted at context creation."""
    out = complete(latent_typed["IQ4_NL"], "-p", "hi", "-n", "8")
    assert "CPU_REPACK" in out.stderr  # repacking was on: the other factors still use it


# ---------------------------------------------------------------- imatrix of latent files


def _imatrix(bins: Path, model: Path, text: Path, out: Path, env: dict, *extra: str) -> dict[str, np.ndarray]:
    res = subprocess.run([str(bins / "llama-imatrix"), "-m", str(model), "-f", str(text), "-c", "128", "--chunks",
                          "3", "-o", str(out), *extra], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, **env))
    assert res.returncode == 0, res.stderr[-1500:]
    reader = gguf.GGUFReader(str(out))
    t = {x.name: np.asarray(x.data, dtype=np.float64).reshape(-1) for x in reader.tensors}
    return {n[: -len(".in_sum2")]: t[n] / t[n[: -len(".in_sum2")] + ".counts"][0]
            for n in t if n.endswith(".in_sum2")}


@pytest.mark.parametrize("arch, fa", [("llama", "off"), ("qwen2", "off"), ("qwen3", "on"), ("mistral3", "on"),
                                      ("gemma3", "off")])
def test_imatrix_of_latent_file_equals_cache_off(bins, tiny, text_small, tmp_path, arch, fa):
    """llama-imatrix with the latent cache on collects every factor, A_k and A_v included, and the
    mean squared inputs equal those with the cache off (F16-rounded latents: within 1%)."""
    model = tiny[arch]["kv"]
    on = _imatrix(bins, model, text_small, tmp_path / "on.gguf", {}, "-fa", fa)
    off = _imatrix(bins, model, text_small, tmp_path / "off.gguf", {"ASVD_LATENT_KV": "0"}, "-fa", fa)
    assert sorted(on) == sorted(off)
    want = {f"blk.{i}.attn_{kv}.{f}.weight" for i in range(2) for kv in "kv" for f in ("lr_in", "lr_out")}
    assert want <= set(on), sorted(want - set(on))
    assert not any("(" in name for name in on)  # no "(reshaped)" / "(view)" entries
    for name in on:
        assert on[name].shape == off[name].shape, name
        assert np.allclose(on[name], off[name], rtol=1e-2, atol=1e-6 * off[name].max()), name


def test_low_bit_quantization_of_latent_file_uses_imatrix(bins, tiny, text_small, tmp_path):
    """The issue's input: IQ4_XS with an imatrix made with the cache on finds weights for every factor."""
    model = tiny["llama"]["kv"]
    imat = tmp_path / "imatrix.gguf"
    _imatrix(bins, model, text_small, imat, {})
    res = subprocess.run([str(bins / "llama-quantize"), "--imatrix", str(imat), str(model), str(tmp_path / "q.gguf"),
                          "IQ4_XS", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-1500:]
    log = res.stdout + res.stderr
    assert re.search(r"did not find weights for blk\.1\.attn_k\.lr_in", log) is None  # the check can see one
    assert "did not find weights for blk." not in log  # (token_embd / output are never in an imatrix)


# ---------------------------------------------------------------- llama-perplexity's last lines


def test_perplexity_summary_never_lost(tiny, text_small, tmp_path):
    """40 short runs of each mode: every one prints its summary (the async logger used to drop the
    last lines at exit, in 3 of 40 runs and in every run with some short settings)."""
    model = tiny["llama"]["kv"]
    base = kld_base(model, text_small, tmp_path / "base.kld", {"ASVD_LATENT_KV": "0"})
    lost = []
    for i in range(40):
        chunks, ctx = 1 + i % 3, (64, 128)[i % 2]
        try:
            llamacpp.perplexity(model, text_small, ctx=ctx, chunks=chunks)
        except UserError as e:
            lost.append(("ppl", chunks, ctx, str(e)))
        try:
            llamacpp.perplexity(model, text_small, ctx=128, chunks=1 + i % 3, kl_base=base)
        except UserError as e:
            lost.append(("kld", chunks, str(e)))
    assert not lost, lost


def test_missing_summary_says_what_was_found(tmp_path, monkeypatch):
    """When the summary line is truly missing, the error names what llama-perplexity did print."""
    cut = "perplexity: calculating perplexity over 4 chunks, n_ctx=128\n[1]12.5,[2]13.1,\n"
    monkeypatch.setattr(llamacpp, "_run_tool", lambda cmd, env=None: cut)
    monkeypatch.setattr(llamacpp, "binary", lambda name: tmp_path / name)
    model, text = tmp_path / "m.gguf", tmp_path / "t.txt"
    model.write_bytes(b"x")
    text.write_text("x")
    want = r"no ppl summary; found 2 chunk values of 4; last line: '\[1\]12.5,\[2\]13.1,'"
    with pytest.raises(UserError, match=want):
        llamacpp.perplexity(model, text)


# ---------------------------------------------------------------- saved states that do not fit


def test_llama_bench_depth_state_across_models(bins, tiny):
    """The issue's input: llama-bench restores the depth state of the previous model into the
    next one; into a latent cache that aborted. Now it is refused and the depth re-run."""
    res = subprocess.run([str(bins / "llama-bench"), "-m", str(tiny["llama"]["dense"]), "-m", str(tiny["llama"]["kv"]),
                          "-m", str(tiny["qwen2"]["kv"]), "-p", "0", "-n", "4", "-d", "256", "-r", "2", "-t", "2",
                          "-o", "csv"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len([ln for ln in res.stdout.splitlines() if "tg4" in ln or '"4"' in ln]) >= 3, res.stdout


def test_llama_bench_depth_state_smollm2(bins, tmp_path):
    """The issue's input on the real model, where the old clean-up of the refused state wrote past the
    latent K tensor (`tensor write out of bounds`, exit 134): stock SmolLM2 then a latent file."""
    latent = fx.write_factored(fx.smollm2_path(), tmp_path / "smol-kv.gguf", rank=lambda b, il, s: 64,
                               linears=("attn_k", "attn_v"), kv_latent=True, outtype="f16")
    res = subprocess.run([str(bins / "llama-bench"), "-m", str(fx.smollm2_path()), "-m", str(latent), "-p", "0",
                          "-n", "4", "-d", "512", "-r", "2", "-t", "2", "-o", "csv", "--progress", "-v"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(res.stdout.strip().splitlines()) == 3, res.stdout  # header + one row per model
    # llama-bench logs only with -v; the stock model's cached state is refused by name, then re-run
    assert "rows are" in res.stderr, res.stderr[-2000:]
    assert "benchmark 2/2: depth run 1/2\n" in res.stderr, res.stderr[-2000:]


PROMPT = ("-p", "Once upon a time there was a", "-n", "8", "-c", "256")


def _session(model: Path, path: Path, env: dict | None = None) -> Path:
    complete(model, *PROMPT, "--prompt-cache", str(path), env=env)
    assert path.is_file() and path.stat().st_size > 0
    return path


def _refused(model: Path, session: Path, env: dict | None = None) -> str:
    res = complete(model, *PROMPT, "--prompt-cache", str(session), env=env, check=False)
    log = res.stdout + res.stderr
    assert res.returncode == 1, (res.returncode, log[-2000:])  # refused, not aborted (134)
    assert "failed to load session file" in log, log[-2000:]
    return log


def test_session_from_another_model_is_refused(tiny, tmp_path):
    s = _session(tiny["llama"]["dense"], tmp_path / "dense.session")
    log = _refused(tiny["llama"]["kv"], s)
    assert "rows are" in log and "this cache is latent" in log


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_session_latent_on_then_off_and_reverse(tiny, tmp_path, arch):
    model = tiny[arch]["kv"]
    on = _session(model, tmp_path / "on.session")
    off = _session(model, tmp_path / "off.session", {"ASVD_LATENT_KV": "0"})
    assert "this cache is not latent" in _refused(model, on, {"ASVD_LATENT_KV": "0"})
    assert "this cache is latent" in _refused(model, off)


def test_truncated_session_is_refused(tiny, tmp_path):
    s = _session(tiny["llama"]["kv"], tmp_path / "full.session")
    cut = tmp_path / "cut.session"
    cut.write_bytes(s.read_bytes()[: s.stat().st_size - 1000])
    assert "truncated" in _refused(tiny["llama"]["kv"], cut)


def test_session_with_altered_row_size_is_refused(tiny, tmp_path):
    """A K row-size field changed in the file (r_k = 32 F16 values: 64 bytes) is caught by the check
    that runs before any row is read."""
    s = _session(tiny["llama"]["kv"], tmp_path / "ok.session")
    data = bytearray(s.read_bytes())
    k_type_and_row = np.array([1], "<i4").tobytes() + np.array([64], "<u8").tobytes()  # F16, 64 bytes
    pos = bytes(data).find(k_type_and_row)
    assert pos > 0
    data[pos + 4: pos + 12] = np.array([48], "<u8").tobytes()
    bad = tmp_path / "bad.session"
    bad.write_bytes(bytes(data))
    assert "rows are 48 bytes, this cache's 64" in _refused(tiny["llama"]["kv"], bad)


@pytest.mark.parametrize("arch", ["mistral3", "gemma3"])
def test_valid_session_still_restores(tiny, tmp_path, arch):
    """The checks refuse nothing valid: the same model and settings restore and continue identically."""
    model = tiny[arch]["kv"]
    s = tmp_path / "ok.session"
    first = complete(model, *PROMPT, "--prompt-cache", str(s))
    second = complete(model, *PROMPT, "--prompt-cache", str(s))
    assert "loaded a session" in second.stderr and second.stdout == first.stdout


# ---------------------------------------------------------------- NF4's type id


def _set_nf4_id(path: Path, new_id: int) -> int:
    """Rewrite, in place, the type id of every NF4 tensor (to what files before the move carried)."""
    reader = gguf.GGUFReader(str(path), "r+")
    n = 0
    for t in reader.tensors:
        part = t.field.parts[4]  # the parts of a tensor info: name length, name, n_dims, dims, type, offset
        if int(part[0]) == NF4_ID:
            part[0] = new_id
            n += 1
    reader.data.flush()
    return n


def test_nf4_legacy_id_read_in_asvd_files_only(bins, tiny, text_small, tmp_path):
    nf4 = _quantize(bins, tiny["llama"]["lr"], tmp_path / "nf4.gguf", "NF4", "--pure")
    legacy = tmp_path / "nf4-43.gguf"
    shutil.copy(nf4, legacy)
    assert _set_nf4_id(legacy, NF4_LEGACY_ID) > 0
    a, b = ppl(nf4, text_small), ppl(legacy, text_small)
    assert a["ppl"] == b["ppl"]  # the same bytes, read as the same type

    from asvd2gguf.errors import AsvdWarning
    from asvd2gguf.ggml_quants import NF4
    from asvd2gguf.gguf_fast import FastGGUFReader
    with pytest.warns(AsvdWarning, match="old NF4 type id 43"):
        r = FastGGUFReader(legacy)
    assert all(t.tensor_type == NF4 for t in r.tensors if t.name.endswith(".lr_in.weight"))

    # the same file without asvd metadata: 43 is not NF4 there (upstream's id), so it is refused
    stock = tmp_path / "stock-43.gguf"
    raw = bytearray(legacy.read_bytes())
    at = raw.find(b"asvd.format_version")
    raw[at: at + 4] = b"xxxx"
    stock.write_bytes(bytes(raw))
    with pytest.raises(UserError):
        ppl(stock, text_small)
    log = subprocess.run([str(bins / "llama-perplexity"), "-m", str(legacy), "-f", str(text_small), "-c", "128",
                          "--chunks", "1"], capture_output=True, text=True, timeout=120)
    assert re.search(r"old NF4 type id 43, read as NF4 \(64\)", log.stdout + log.stderr)


# ---------------------------------------------------------------- llama-server slot files (item 7)


def _server_slots(tmp_path: Path):
    """(slot folder, start(model, name, env) -> server context) for 1-slot servers sharing one folder."""
    from asvd2gguf.llama_server import llama_server

    slots = tmp_path / "slots"
    slots.mkdir(exist_ok=True)

    def start(model: Path, name: str, env: dict | None = None):
        return llama_server(model, ("-t", "2", "-np", "1", "-c", "256", "--no-warmup", "--slot-save-path", f"{slots}/"),
                            log=tmp_path / f"{name}.log", env=env)

    return slots, start


def _slot_request(url: str, action: str, filename: str):
    import httpx

    return httpx.post(f"{url}/slots/0?action={action}", json={"filename": filename}, timeout=120)


def _complete_on(url: str) -> dict:
    import httpx

    r = httpx.post(f"{url}/completion", json={"prompt": "Once upon a time there was a", "n_predict": 8,
                                               "temperature": 0, "id_slot": 0, "cache_prompt": True}, timeout=120)
    assert r.status_code == 200, r.text[:500]
    return r.json()


def _save_slot(start, model: Path, name: str, env: dict | None = None) -> dict:
    with start(model, f"save-{name}", env) as srv:
        done = _complete_on(srv.url)
        r = _slot_request(srv.url, "save", f"{name}.bin")
        assert r.status_code == 200, r.text[:500]
        return done


def test_server_slot_files_are_checked(tiny, tmp_path):
    """llama-server's /slots restore goes through the same state check as sessions: a slot saved by
    another model, with the latent cache on vs off, or truncated, is refused with an HTTP error and
    the reason in the log, and the server keeps serving; a valid slot restores and continues."""
    pytest.importorskip("httpx")
    slots, start = _server_slots(tmp_path)
    model = tiny["llama"]["kv"]
    _save_slot(start, tiny["llama"]["dense"], "dense")
    _save_slot(start, model, "full", {"ASVD_LATENT_KV": "0"})
    valid = _save_slot(start, model, "latent")
    cut = slots / "cut.bin"
    cut.write_bytes((slots / "latent.bin").read_bytes()[:-1000])
    with start(model, "restore") as srv:
        for name, reason in (("dense", "this cache is latent"), ("full", "this cache is latent"), ("cut", "truncated")):
            before = srv.log_text()
            r = _slot_request(srv.url, "restore", f"{name}.bin")
            assert r.status_code >= 400, (name, r.text[:300])
            assert reason in srv.log_text()[len(before):], (name, srv.log_text()[-1500:])
            assert srv.proc.poll() is None  # still serving
        r = _slot_request(srv.url, "restore", "latent.bin")
        assert r.status_code == 200 and r.json()["n_restored"] > 0, r.text[:300]
        again = _complete_on(srv.url)
    assert again["content"] == valid["content"] and again["timings"]["cache_n"] > 0


def test_session_of_another_model_into_an_iswa_cache_names_the_half(tiny, tmp_path):
    """gemma3's iswa cache reads a saved state half by half: a state of a gemma3 with other layers
    is refused with the half that counted its layers named (it said "this cache 1", a count of
    one half that matched neither model's layer count)."""
    four = fx.write_tiny("gemma3", tmp_path / "gemma3-4l.gguf", n_layer=4)
    s = _session(four, tmp_path / "four.session")
    log = _refused(tiny["gemma3"]["dense"], s)
    assert "KV layers, this cache 1 (the" in log and "layers of an iswa cache)" in log, log[-2000:]
