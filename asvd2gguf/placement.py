"""Multi-device placement through accelerate's device_map (`convert --device-map`, `--max-memory`).

Without a map the converter keeps the model on the CPU and moves one block at a time to
`--device` (blocks.py). With a map, transformers' `from_pretrained(device_map=...)` lets
accelerate place every module (GPUs, CPU, or disk with accelerate's offload hooks) and every
stage runs each block where the map put it. This module only parses and checks the user's
options and wraps accelerate's own helpers (hooks' execution devices, `align_module_device`);
where a module goes is always accelerate's decision, never ours.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Placement:
    """What `from_pretrained` receives: a strategy name or a module -> device dict, and max_memory."""

    device_map: str | dict[str, int | str]
    max_memory: dict[int | str, int | str] | None = None


def resolve_placement(device_map: str | None, max_memory: str | None, device: str) -> Placement | None:
    """Parse and check --device-map / --max-memory before any slow loading; None keeps today's path."""
    if device_map is None:
        if max_memory is not None:
            raise UserError("--max-memory needs --device-map (auto, balanced, balanced_low_0 or sequential)")
        return None
    if device != "auto":
        raise UserError(f"--device {device} cannot be combined with --device-map: the map places every block "
                        "itself; leave --device at auto")
    dm = parse_device_map(device_map)
    if max_memory is not None and isinstance(dm, dict):
        raise UserError("--max-memory only applies to a named --device-map strategy, not to a JSON map")
    return Placement(dm, parse_max_memory(max_memory) if max_memory is not None else None)


def parse_device_map(spec: str) -> str | dict[str, int | str]:
    """A strategy name, or the module -> device dict read from a JSON file (accelerate's format)."""
    if spec in STRATEGIES:
        return spec
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"unknown --device-map '{spec}'; use {', '.join(STRATEGIES)} or a JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read --device-map {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"--device-map {path} must be a non-empty JSON object mapping module names to devices")
    return {str(k): check_device(v, f"--device-map {path}: '{k}'") for k, v in data.items()}


def check_device(value, where: str) -> int | str:
    """A device accelerate accepts and this machine has: a GPU index, 'cuda[:N]', 'cpu' or 'disk'."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{where}: device must be a GPU index, 'cuda:N', 'cpu' or 'disk', got {value!r}")
    if value in ("cpu", "disk"):
        return value
    if isinstance(value, str):
        if value == "cuda":
            value = "cuda:0"
        if not value.startswith("cuda:") or not value[5:].isdigit():
            raise UserError(f"{where}: unknown device '{value}'; use a GPU index, 'cuda:N', 'cpu' or 'disk'")
        index = int(value[5:])
    else:
        index = value
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not 0 <= index < n_gpu:
        raise UserError(f"{where}: no GPU {index} on this machine ({n_gpu} visible to torch)")
    return index


def parse_max_memory(spec: str) -> dict[int | str, int | str]:
    """'0=20GiB,1=20GiB,cpu=60GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '60GiB'} (accelerate's max_memory)."""
    from accelerate.utils import convert_file_size_to_int

    out: dict[int | str, int | str] = {}
    for item in spec.split(","):
        dev, sep, size = (s.strip() for s in item.partition("="))
        if not sep or not dev or not size:
            raise UserError(f"malformed --max-memory '{spec}'; expected DEVICE=SIZE[,...], e.g. 0=20GiB,cpu=60GiB")
        key = check_device(int(dev) if dev.isdigit() else dev, "--max-memory")
        if key == "disk":
            raise UserError("--max-memory: 'disk' has no limit to set; name GPU indices and cpu")
        try:
            value = int(size) if size.isdigit() else size
            if convert_file_size_to_int(value) <= 0:
                raise ValueError
        except ValueError:
            raise UserError(f"--max-memory: bad size '{size}' for {dev}; use e.g. 20GiB, 500MB or bytes") from None
        out[key] = value
    return out


# ---------------------------------------------------------------- loading


def offload_folder(cache_dir: Path, fingerprint: str) -> Path:
    """A fresh folder for this run under <cache-dir>/offload/<fingerprint>; dead runs' folders are removed.

    One folder per process: two conversions of the same model never write or delete each other's
    offloaded weights, and a killed run's leftovers go away on the next run.
    """
    root = cache_dir / "offload" / fingerprint
    root.mkdir(parents=True, exist_ok=True)
    for p in root.glob("run-*"):
        if not _alive(p.name[4:]):
            shutil.rmtree(p, ignore_errors=True)
    path = root / f"run-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)  # a previous process with our pid is gone
    path.mkdir()
    return path


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def remove_offload(path: Path | None) -> None:
    """Delete this run's offload folder (weights offloaded by transformers, if it resaved any)."""
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def check_map_covers(folder: Path, device_map: dict[str, int | str]) -> None:
    """Every module name in a JSON map exists and every weight has a device (accelerate's check_device_map).

    Done on an empty (meta) model before loading: transformers would otherwise quietly leave a
    partial map's remaining weights on the CPU, outside the map.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import check_device_map
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    names = {n for n, _ in meta.named_modules()}
    unknown = [k for k in device_map if k not in names]
    if unknown:
        raise UserError(f"--device-map names modules this model does not have: {', '.join(unknown[:5])}")
    try:
        check_device_map(meta, device_map)
    except ValueError as e:
        head, _, names = str(e).splitlines()[0].partition(": ")
        missing = names.split(", ")
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"--device-map gives no device to some weights: {', '.join(missing[:3])}{more}") from None


def load_kwargs(placement: Placement, offload: Path) -> dict:
    """Keyword arguments for transformers' from_pretrained."""
    import logging

    logging.getLogger("accelerate").setLevel(logging.ERROR)  # "parameters on the meta device": expected here
    kw = {"device_map": placement.device_map, "offload_folder": str(offload)}
    if placement.max_memory is not None:
        kw["max_memory"] = placement.max_memory
    return kw


# ---------------------------------------------------------------- running on a dispatched model


def _hooks(module):
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return ()
    return tuple(getattr(hook, "hooks", (hook,)))  # a SequentialHook holds several


def execution_device(module) -> torch.device:
    """Where accelerate runs `module`: its hook's execution device, else where its tensors are.

    A map onto a single device gets no hooks at all (accelerate just moves the model there).
    """
    for mod in module.modules():
        for hook in _hooks(mod):
            if getattr(hook, "execution_device", None) is not None:
                return torch.device(hook.execution_device)
        for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)):  # rotary tables: buffers only
            if t.device.type != "meta":
                return t.device
    return torch.device("cpu")


def main_device(model) -> torch.device:
    """accelerate's main device: the top-level hook's execution device (first GPU in the map, else cpu)."""
    return execution_device(model)


@contextmanager
def materialized(module):
    """Offloaded weights of `module` and its submodules loaded onto their execution device for the step.

    accelerate's `align_module_device` does it per module; modules without offload hooks (and
    every module of an undispatched model) are left exactly as they are.
    """
    offloaded = [m for m in module.modules() if _hooks(m)]
    if not offloaded:
        yield module
        return
    from accelerate.utils import align_module_device, has_offloaded_params

    with ExitStack() as stack:
        for m in offloaded:
            if has_offloaded_params(m):
                stack.enter_context(align_module_device(m))
        yield module


def cpu_state_items(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state dict on the CPU, offloaded entries materialized one module at a time."""
    for name, t in model.state_dict().items():
        if t.device.type == "cpu":
            yield name, t
            continue
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        with materialized(mod):
            value = getattr(mod, attr).detach().to("cpu")
        yield name, value


def map_summary(model) -> str:
    """How many modules accelerate put on each device (hf_device_map), for the stage line."""
    counts: dict[str, int] = {}
    for dev in (getattr(model, "hf_device_map", None) or {}).values():
        counts[str(dev)] = counts.get(str(dev), 0) + 1
    return ", ".join(f"{d}: {n}" for d, n in counts.items()) or "(single device)"
