"""convert --device-map: accelerate places the model (here CPU and disk offload), output unchanged.

This machine has no GPU, so what runs here is the dispatched path with accelerate's hooks and
disk offload on one device; multi-GPU maps are only checked for parsing and device existence.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from clitools import run_cli
from rich.console import Console

from asvd2gguf.convert import ConvertConfig, convert
from asvd2gguf.errors import UserError
from asvd2gguf.placement import parse_max_memory, resolve_placement


def _write_map(path: Path, n_layer: int, disk: set[int]) -> Path:
    """Embeddings, final norm, rotary tables and head on the CPU; the blocks in `disk` offloaded."""
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    dm.update({f"model.layers.{i}": "disk" if i in disk else "cpu" for i in range(n_layer)})
    path.write_text(json.dumps(dm))
    return path


def _gguf_contents(path: Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Every tensor's raw data and every asvd.* metadata value of a GGUF."""
    r = gguf.GGUFReader(path)
    tensors = {t.name: np.array(t.data) for t in r.tensors}
    meta = {k: f.contents() for k, f in r.fields.items() if k.startswith("asvd.")}
    return tensors, meta


def _common(calib_text) -> list:
    return ["--calib", calib_text, "--calib-samples", "4", "--calib-seqlen", "64", "--outtype", "f32"]


@pytest.mark.parametrize("arch,extra", [
    ("qwen2", ["--ratio", "0.7", "--kv", "0.75", "--sensitivity", "ppl", "--sweep-samples", "1"]),
    ("llama", ["--ratio", "0.8", "--quant", "q8_0"]),
])
def test_cpu_and_disk_map_writes_the_same_file(arch, extra, tiny_models, calib_text, tmp_path, capsys):
    """Same tensors and ranks with and without a map; separate caches, so every stage runs mapped."""
    plain, mapped = tmp_path / "plain.gguf", tmp_path / "mapped.gguf"
    dm = _write_map(tmp_path / "map.json", 2, disk={1})
    code, _, err = run_cli(["convert", tiny_models[arch], *_common(calib_text), *extra, "--out", plain,
                            "--cache-dir", tmp_path / "cache_plain", "--device", "cpu"], capsys)
    assert code == 0, err
    # the vocab-only donor GGUF does not depend on placement: reuse it, recompute everything else
    shutil.copytree(tmp_path / "cache_plain" / "donors", tmp_path / "cache_mapped" / "donors")
    code, _, err = run_cli(["convert", tiny_models[arch], *_common(calib_text), *extra, "--out", mapped,
                            "--cache-dir", tmp_path / "cache_mapped", "--device-map", dm], capsys)
    assert code == 0, err
    assert "with device map cpu: 5, disk: 1" in err

    ta, ma = _gguf_contents(plain)
    tb, mb = _gguf_contents(mapped)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)
    assert any(k.startswith("asvd.rank.") for k in ma)
    assert ma == mb  # ranks, achieved ratios and the calibration perplexity alike
    runs = list((tmp_path / "cache_mapped" / "offload").glob("*/run-*"))
    assert runs == []  # this run's offload folder is gone


def test_gguf_source_with_named_strategy(tiny_models, calib_text, tmp_path):
    """A .gguf source loads its cached safetensors folder with the map: 'auto' with a CPU limit that
    sends the blocks to disk."""
    src = tmp_path / "src.gguf"
    base = dict(calib=str(calib_text), calib_samples=4, calib_seqlen=64, outtype="f32")
    convert(ConvertConfig(model=str(tiny_models["qwen3"]), out=src, ratio=1.0, dense=True, device="cpu",
                          cache_dir=tmp_path / "c0", **base))
    a = convert(ConvertConfig(model=str(src), out=tmp_path / "a.gguf", ratio=0.7, device="cpu",
                              cache_dir=tmp_path / "c1", **base))
    log = io.StringIO()
    b = convert(ConvertConfig(model=str(src), out=tmp_path / "b.gguf", ratio=0.7, device_map="auto",
                              max_memory="cpu=3MB", cache_dir=tmp_path / "c2", **base), Console(file=log, width=300))
    assert "disk: " in log.getvalue()
    assert a.ranks == b.ranks and a.calib_ppl == b.calib_ppl
    ta, _ = _gguf_contents(a.out)
    tb, _ = _gguf_contents(b.out)
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)


def _args(tiny_models, calib_text, tmp_path, *extra) -> list:
    return ["convert", tiny_models["llama"], *_common(calib_text), "--out", tmp_path / "o.gguf",
            "--cache-dir", tmp_path / "cache", *extra]


def _json(tmp_path: Path, data) -> Path:
    p = tmp_path / "m.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


@pytest.mark.parametrize("extra,fragment", [
    (["--device-map", "everywhere"], "unknown --device-map 'everywhere'"),
    (["--device-map", "auto", "--device", "cpu"], "--device cpu cannot be combined with --device-map"),
    (["--device-map", "auto", "--device", "cuda"], "--device cuda cannot be combined with --device-map"),
    (["--max-memory", "cpu=1GiB"], "--max-memory needs --device-map"),
    (["--device-map", "auto", "--max-memory", "cpu1GiB"], "malformed --max-memory"),
    (["--device-map", "auto", "--max-memory", "cpu=lots"], "bad size 'lots'"),
    (["--device-map", "auto", "--max-memory", "63=1GiB"], "no GPU 63"),
    (["--device-map", "auto", "--max-memory", "tpu=1GiB"], "unknown device 'tpu'"),
])
def test_option_errors(extra, fragment, tiny_models, calib_text, tmp_path, capsys):
    code, _, err = run_cli(_args(tiny_models, calib_text, tmp_path, *extra), capsys)
    _one_line(code, err, fragment)


@pytest.mark.parametrize("content,fragment", [
    ("{not json", "cannot read --device-map"),
    ([1, 2], "must be a non-empty JSON object"),
    ({}, "must be a non-empty JSON object"),
    ({"model.embed_tokens": "cuda:63"}, "no GPU 63"),
    ({"model.embed_tokens": 63}, "no GPU 63"),
    ({"model.embed_tokens": "tpu"}, "unknown device 'tpu'"),
    ({"model.embed_tokens": True}, "device must be"),
    ({"model.embed_tokens": "cpu"}, "gives no device to some weights: model.layers.0.self_attn.q_proj.weight"),
    ({"": "cpu", "model.layer.0": "disk"}, "names modules this model does not have: model.layer.0"),
])
def test_json_map_errors(content, fragment, tiny_models, calib_text, tmp_path, capsys):
    code, _, err = run_cli(_args(tiny_models, calib_text, tmp_path, "--device-map", _json(tmp_path, content)), capsys)
    _one_line(code, err, fragment)
    assert not list((tmp_path / "cache" / "offload").glob("*/run-*"))


def test_json_map_with_max_memory_is_refused(tmp_path):
    dm = _write_map(tmp_path / "map.json", 2, disk=set())
    with pytest.raises(UserError, match="only applies to a named --device-map strategy"):
        resolve_placement(str(dm), "cpu=1GiB", "auto")


def test_max_memory_parsing():
    assert parse_max_memory("cpu=60GiB, cpu=2000") == {"cpu": 2000}
    assert resolve_placement(None, None, "cuda") is None
    p = resolve_placement("balanced", "cpu=1GiB", "auto")
    assert p.device_map == "balanced" and p.max_memory == {"cpu": "1GiB"}


def _one_line(code: int, err: str, fragment: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert fragment in lines[0], err


def test_selfgen_on_a_dispatched_model(tiny_models, tmp_path):
    """--calib selfgen samples the same text from the disk-offloaded model as from the plain one."""
    from asvd2gguf.placement import Placement
    from asvd2gguf.source import load_source
    from asvd2gguf.text import selfgen_windows

    dm = json.loads(_write_map(tmp_path / "map.json", 2, disk={0}).read_text())
    plain = load_source(str(tiny_models["llama"]), tmp_path / "c")
    mapped = load_source(str(tiny_models["llama"]), tmp_path / "c", Placement(dm))
    try:
        assert mapped.model.hf_device_map["model.layers.0"] == "disk"
        a = selfgen_windows(plain.model, plain.tokenizer, 2, 16, 5)
        b = selfgen_windows(mapped.model, mapped.tokenizer, 2, 16, 5)
        assert np.array_equal(a.numpy(), b.numpy())
    finally:
        from asvd2gguf.placement import remove_offload

        remove_offload(mapped.offload_dir)
