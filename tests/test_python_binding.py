"""llama-cpp-python built from the same patched tree (`asvd2gguf build-llama --python`).

The wheel (llamacpp.build_python(), cached by the build key) is installed into a fresh virtual
environment (system site-packages visible for numpy and jinja2; anything missing comes from
PyPI); a latent-KV SmolLM2 file is then run through llama_cpp.Llama.create_chat_completion,
greedy, and compared with llama-completion on the prompt that the same chat template renders.
"""

from __future__ import annotations

import json
import os
import subprocess
import venv
from pathlib import Path

import pytest

from asvd2gguf import llamacpp

pytestmark = [pytest.mark.slow, pytest.mark.llama]

QUESTION = "Write a short story about a lighthouse keeper."
N = 48

SCRIPT = r"""
import json, sys
import llama_cpp
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
model, n = sys.argv[1], int(sys.argv[2])
messages = [{"role": "user", "content": sys.argv[3]}]
llm = Llama(model_path=model, n_ctx=1024, n_threads=2, flash_attn=True, seed=1, verbose=True)
res = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=n)
fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                          eos_token=llm._model.token_get_text(llm.token_eos()), bos_token="")
print(json.dumps({"module": llama_cpp.__file__, "text": res["choices"][0]["message"]["content"],
                  "finish": res["choices"][0]["finish_reason"], "n": res["usage"]["completion_tokens"],
                  "prompt": fmt(messages=messages).prompt}))
"""


@pytest.fixture(scope="module")
def py_env(module_tmp) -> Path:
    """A venv with the patched llama-cpp-python wheel installed; returns its python."""
    wheel = llamacpp.build_python()
    root = module_tmp("llama-cpp-python")
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(root / "venv")
    py = root / "venv" / "bin" / "python"
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return py


def test_chat_completion_equals_llama_completion(py_env, smol_latent, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(py_env), "-c", SCRIPT, str(smol_latent), str(N), QUESTION], capture_output=True,
                         text=True, timeout=900, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["module"].startswith(str(py_env.parent.parent))  # the wheel's copy, not another install
    assert "latent KV cache enabled" in res.stderr  # the patched loader ran (stock llama.cpp refuses the file)
    assert out["prompt"].endswith("<|im_start|>assistant\n") and QUESTION in out["prompt"]
    # llama-completion, same prompt (special tokens parsed), same context, greedy, same flash attention
    comp = subprocess.run([str(llamacpp.binary("llama-completion")), "-m", str(smol_latent), "-p", out["prompt"],
                           "-n", str(N), "--temp", "0", "-no-cnv", "-c", "1024", "-t", "2", "-fa", "on",
                           "--no-warmup", "--no-display-prompt", "-s", "1"],
                          capture_output=True, text=True, errors="replace", timeout=600)
    assert comp.returncode == 0, comp.stderr[-2000:]
    ref = comp.stdout.strip().removesuffix("[end of text]")  # what llama-completion prints at an EOG token
    assert out["n"] >= 16 and out["text"].strip() == ref.strip(), (out["text"], ref)


def test_wheel_is_cached_by_the_build_key(py_env):
    """A second build_python() returns the same wheel at once; plan() reports it under the key."""
    p = llamacpp.plan()
    assert p.wheel is not None and p.wheel == llamacpp.build_python()
    assert p.key in str(p.wheel) and p.wheel.name.startswith("llama_cpp_python-0.3.36-")
