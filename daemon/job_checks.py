"""Settings a job can never train with, refused at admission instead of after a worker started.

Today a worker finds these late: after loading torch and the model, sometimes after the job waited
hours in the queue, and a few (``device = "cuda"`` without a GPU, more processes than GPUs) end in a
crash rather than a reason. Everything here needs no torch: the daemon is a light process, so it
reads the GPU count through NVML and model folders as plain JSON. Each problem is one sentence
naming the key, its value and the fix, fit for the job's error file. The worker's own preflight
(``core/preflight.py``) still runs: it knows what only a loaded model can tell (positions, memory,
bf16 support of a GPU, LoRA target names).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainbox.config import TrainingConfig

MAX_CONFIG_BYTES = 16 * 1024**2  # a real config.json is a few kB; this bounds what a hostile one costs
MAX_ADAPTER_CHAIN = 64  # core/lora.py MAX_CHAIN: adapters on adapters; longer is a loop
ADAPTER_CONFIG = "adapter_config.json"
# "gpt2", "org/name": what from_pretrained would look up on the hub when no such folder exists
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


# --- settings ------------------------------------------------------------------------------------


def runs_on_cuda(training: TrainingConfig, gpus: int) -> bool:
    """The worker's ``pick_device``: cuda when asked for, or on auto when a GPU is visible."""
    return training.device == "cuda" or (training.device == "auto" and gpus > 0)


def planned_processes(training: TrainingConfig, gpus: int) -> int:
    """The job's ranks: the worker's ``resolve_nproc`` (nproc, or for 0 one per visible GPU, whatever the
    device, else 1) on each of its ``nnodes`` hosts, taken to be alike."""
    return (training.nproc if training.nproc > 0 else max(1, gpus)) * training.nnodes


def check_job_settings(
    training: TrainingConfig, *, gpus: int, cpus: int, bitsandbytes: bool | None = None
) -> list[str]:
    """Every problem of ``training`` on a machine with ``gpus`` visible GPUs and ``cpus`` usable CPUs.

    ``bitsandbytes``: whether that package is importable (``bitsandbytes_installed()``); None skips
    that check. An empty list means the worker will at least get to load the model.
    """
    cuda = runs_on_cuda(training, gpus)
    world = planned_processes(training, gpus)
    return [
        *_device_problems(training, gpus, cpus, cuda),
        *_process_problems(training, world),
        *_node_problems(training),
        *_lora_problems(training, gpus, cuda, bitsandbytes),
    ]


def _where(training: TrainingConfig, gpus: int) -> str:
    return f"this job runs on the CPU (device = {training.device!r}, {gpus} GPU(s) visible)"


def _device_problems(training: TrainingConfig, gpus: int, cpus: int, cuda: bool) -> list[str]:
    out = []
    if training.device == "cuda" and gpus == 0:
        out.append(
            "device = 'cuda' but no CUDA GPU is visible to trainbox (NVML finds none, or CUDA_VISIBLE_DEVICES "
            "hides them): set device = 'auto' (the CPU when there is no GPU) or 'cpu'."
        )
    n = training.nproc
    if n > 0 and cuda and gpus > 0 and n > gpus:
        out.append(
            f"nproc = {n} asks for one process per GPU on {n} GPUs but only {gpus} GPU(s) are visible: set "
            f"nproc = {gpus} or less, or nproc = 0 for one process per visible GPU."
        )
    if n > 0 and not cuda and n > cpus:
        out.append(
            f"nproc = {n} asks for {n} training processes on the CPU but only {cpus} CPU(s) are usable: set "
            f"nproc = {cpus} or less."
        )
    if training.precision == "bf16" and not cuda:
        out.append(
            f"precision = 'bf16' needs a GPU with bf16 support but {_where(training, gpus)}: set precision = "
            "'auto' (fp32 on the CPU) or 'fp32'."
        )
    return out


def _node_problems(training: TrainingConfig) -> list[str]:
    if training.nnodes > 1 and not training.rdzv_endpoint:
        return [
            f"nnodes = {training.nnodes} spans {training.nnodes} hosts, which meet at a rendezvous, but "
            "rdzv_endpoint is not set: set rdzv_endpoint = 'host:port' (the claiming host's address as every "
            "host reaches it, and a free TCP port) in the sidecar or in trainbox.toml's [training], or nnodes = 1."
        ]
    return []


def _process_problems(training: TrainingConfig, world: int) -> list[str]:
    out = []
    per_node = training.nproc if training.nproc > 0 else world // training.nnodes
    asked = f"nproc = {training.nproc}" + (f" (one per GPU: {per_node})" if training.nproc == 0 else "")
    if training.nnodes > 1:
        asked += f" on nnodes = {training.nnodes} hosts"
    if training.engine == "hybrid" and world > 1:
        out.append(
            f"engine = 'hybrid' runs in one process only but {asked} asks for {world} processes: set nproc = 1 "
            "and nnodes = 1, or engine = 'plain' to train with several processes."
        )
    if training.sharding == "fsdp" and world > 1 and training.lora:
        out.append(
            f"sharding = 'fsdp' does not support LoRA (lora = true, {asked}): set sharding = 'replicate', or "
            "lora = false for a sharded full fine-tune."
        )
    if training.sharding == "fsdp" and world > 1 and training.precision == "fp16":
        out.append(
            "sharding = 'fsdp' does not support precision = 'fp16' (its gradient scaler is not shard-aware): set "
            "precision = 'auto' or 'bf16', or sharding = 'replicate'."
        )
    return out


def _lora_problems(training: TrainingConfig, gpus: int, cuda: bool, bitsandbytes: bool | None) -> list[str]:
    out = []
    if training.lora and training.lora_targets == []:
        out.append(
            "lora_targets = [] names no module to adapt: list module names, or set it to 'auto' or 'all-linear'."
        )
    if not training.lora_4bit:
        return out
    if not training.lora:
        out.append("lora_4bit = true needs lora = true: set lora = true, or lora_4bit = false.")
    if not cuda:
        out.append(
            f"lora_4bit = true (a 4-bit QLoRA base) needs a CUDA GPU but {_where(training, gpus)}: set "
            "lora_4bit = false to train LoRA on the full-precision base."
        )
    if bitsandbytes is False:
        out.append(
            "lora_4bit = true needs the bitsandbytes package, which is not installed: install it into "
            "trainbox's environment (.venv/bin/pip install bitsandbytes), or set lora_4bit = false."
        )
    return out


# --- the starting model --------------------------------------------------------------------------


def _show(value: str) -> str:
    """A user-supplied value quoted for a message, cut short: a sidecar may hold a 60 kB string."""
    return repr(value if len(value) <= 200 else value[:200] + "...")


def check_model_folder(model: str, *, lora_4bit: bool = False) -> str | None:
    """Why ``training.model`` cannot be trained from, or None. "" (continue from the current version)
    is fine. A relative path counts from the current folder, as in the worker (which the daemon
    starts in its own). Messages never quote a file's contents, only the value given."""
    if model == "":
        return None
    shown = _show(model)
    if "\0" in model:
        return f"training.model = {shown} holds a NUL character, which no path can: set it to the model's folder."
    try:
        return _check_folder(model, shown, lora_4bit)
    except OSError as e:  # a name too long, a folder we may not enter, ...
        return f"training.model = {shown} cannot be used: {e.strerror or type(e).__name__}."
    except ValueError:  # a NUL in an adapter's base path
        return f"training.model = {shown} cannot be used: a path on the way to its base model is not valid."


def _check_folder(model: str, shown: str, lora_4bit: bool) -> str | None:
    folder = Path(model)
    if not folder.exists():
        where = "" if folder.is_absolute() else f", counted from {str(Path.cwd())!r}"
        if _HUB_NAME.fullmatch(model):
            return (
                f"trainbox never downloads: training.model must be a local folder, and {shown} is no such folder"
                f"{where}: if it is a Hugging Face hub name, download the model once yourself and set "
                "training.model to its folder."
            )
        return f"training.model = {shown}: no such folder{where}; set it to the model's folder (an absolute path)."
    if not folder.is_dir():
        return f"training.model = {shown} is not a folder: set it to the model's folder (the one holding config.json)."
    for depth in range(MAX_ADAPTER_CHAIN + 1):
        if not (folder / ADAPTER_CONFIG).exists():
            return _check_config(folder / "config.json", shown)
        if lora_4bit and depth == 0:
            return (
                f"training.model = {shown} is a LoRA adapter, which lora_4bit = true cannot quantize: export it as "
                "a full model (trainbox models export V --out DIR) and set training.model to DIR."
            )
        adapter, why = _read_object(folder / ADAPTER_CONFIG)
        base = adapter.get("base_model_name_or_path") if adapter is not None else None
        if not isinstance(base, str) or not base:
            why = why or "names no base model (base_model_name_or_path)"
            whose = "this adapter" if depth == 0 else "an adapter it builds on"
            return f"training.model = {shown}: the {ADAPTER_CONFIG} of {whose} {why}."
        folder = Path(base) if Path(base).is_absolute() else folder / base
        if not folder.is_dir():
            return (
                f"training.model = {shown} is a LoRA adapter whose base folder (named in {ADAPTER_CONFIG}) is missing."
            )
    return f"training.model = {shown}: its adapters' bases form a chain longer than {MAX_ADAPTER_CHAIN} (a loop?)."


def _check_config(path: Path, shown: str) -> str | None:
    if not path.exists():
        return (
            f"training.model = {shown} holds no config.json, so it is not a Hugging Face model folder "
            "(save_pretrained writes one): point it at the folder that has config.json and the weights."
        )
    config, why = _read_object(path)
    if config is None:
        return f"training.model = {shown}: its config.json {why}."
    kind, arch = config.get("model_type"), config.get("architectures")
    if not (isinstance(kind, str) and kind) and not (isinstance(arch, list) and arch):
        return (
            f"training.model = {shown}: its config.json names neither model_type nor architectures, so transformers "
            "cannot tell what model it is: point it at a folder written by save_pretrained."
        )
    return None


def _read_object(path: Path) -> tuple[dict[str, Any] | None, str]:
    """A JSON object from a regular file, or (None, why); never more than MAX_CONFIG_BYTES read, a FIFO
    or device never opened for long (O_NONBLOCK, then fstat), and no content in ``why``."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before opening: opening some devices has effects
            return None, "is not a regular file"
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return None, f"cannot be read ({e.strerror})"
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, "is not a regular file"
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        return None, f"is larger than {MAX_CONFIG_BYTES // 1024**2} MiB"
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    except json.JSONDecodeError as e:
        return None, f"is not valid JSON (line {e.lineno}, column {e.colno})"
    except (ValueError, RecursionError):  # 100,000 nested brackets, a 5,000-digit number
        return None, "is not JSON that can be read"
    if not isinstance(data, dict):
        return None, "is not a JSON object"
    return data, ""


# --- the machine -----------------------------------------------------------------------------------


def count_visible(spec: str | None, uuids: Sequence[str]) -> int:
    """GPUs CUDA shows a process, given ``$CUDA_VISIBLE_DEVICES`` and NVML's devices (their UUIDs, in
    NVML order), by torch's rules (``torch.cuda._parse_visible_devices``): unset shows all; a list of
    indices or of (prefixes of) ``GPU-`` UUIDs stops at the first entry that names no device, and a
    repeated entry hides every device. ``MIG-`` entries are counted, not matched (NVML lists MIG
    instances elsewhere)."""
    if spec is None:
        return len(uuids)
    entries = spec.split(",")
    if not spec.startswith(("GPU-", "MIG-")):
        return _index_ordinals(entries, len(uuids))
    taken: list[str] = []
    for e in entries:
        if e in taken:
            return 0
        if not e.startswith(spec[:4]):
            break
        taken.append(e)
    return len(taken) if spec.startswith("MIG-") else _uuid_ordinals(taken, uuids)


def _uuid_ordinals(candidates: list[str], uuids: Sequence[str]) -> int:
    ordinals: list[int] = []
    for c in candidates:
        matches = [i for i, u in enumerate(uuids) if u.startswith(c)]
        if len(matches) != 1:  # unknown or ambiguous: the list ends here
            break
        if matches[0] in ordinals:
            return 0
        ordinals.append(matches[0])
    return len(ordinals)


def _index_ordinals(entries: list[str], devices: int) -> int:
    seen: list[int] = []
    for e in entries:
        digits = re.match(r"[+-]?\d+", e.strip())  # strtoul-like: "1gpu" is 1, "" or "x" ends the list
        index = int(digits.group()) if digits else -1
        if index in seen:
            return 0
        if index < 0:
            break
        seen.append(index)
    for n, index in enumerate(seen):
        if index >= devices:
            return n
    return len(seen)


def visible_gpus() -> int:
    """CUDA GPUs a worker started now would see: NVML's devices filtered by ``$CUDA_VISIBLE_DEVICES``.
    0 where there is no NVML, no driver or no GPU: a CPU machine is a normal state, not an error."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        spec = os.environ.get("CUDA_VISIBLE_DEVICES")
        count = pynvml.nvmlDeviceGetCount()
        wants_uuids = spec is not None and spec.startswith("GPU-")
        uuids = [_uuid(pynvml, i) if wants_uuids else "" for i in range(count)]
        return count_visible(spec, uuids)
    except pynvml.NVMLError:
        return 0
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _uuid(pynvml: Any, index: int) -> str:
    raw = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container or taskset may allow fewer than exist)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def bitsandbytes_installed() -> bool:
    """Whether the worker could import bitsandbytes (found, not imported: importing it loads torch)."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None
