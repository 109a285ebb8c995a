"""LoRA through peft: which modules get adapters, wrapping a model, and loading any model folder.

A LoRA job trains an adapter on a frozen base. Its checkpoints and its final folder are peft
``save_pretrained`` folders (``adapter_config.json``, ``adapter_model.safetensors``) plus the
tokenizer; ``adapter_config.json``'s ``base_model_name_or_path`` is the absolute path of the folder
the job started from, so an adapter folder says what it applies to.

A base may itself be an adapter folder (a job that started from an adapter version): loading one
(``load_causal_lm``) loads its base, recursively, applies the adapter and merges it (fp32), so every
model folder trainbox writes loads as one plain full model. This is what the next job starts from,
what the eval gate scores, and what ``trainbox models export`` saves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from trainbox.config import TrainingConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_CHAIN = 64  # adapters on adapters; a longer chain is a loop

# "auto" targets by model_type: the attention projections the LoRA paper and common recipes adapt.
QV = ("q_proj", "v_proj")
AUTO_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text"],
        QV,
    ),
    **dict.fromkeys(["phi", "phi3", "opt", "gptj", "olmo", "olmo2", "granite", "smollm3", "starcoder2"], QV),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ("c_attn",)),
    **dict.fromkeys(["gpt_neox", "falcon", "bloom"], ("query_key_value",)),
}


# --- folders ---------------------------------------------------------------------------------------


def is_adapter_folder(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_base(folder: Path) -> Path:
    """The folder an adapter applies to (absolute, or relative to the adapter folder)."""
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path") or ""
    if not base:
        raise ValueError(f"{folder}: {ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    path = Path(base)
    return path if path.is_absolute() else (Path(folder) / path).resolve()


def load_causal_lm(folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    """A full model from any trainbox model folder: a full one as is, an adapter merged into its base.
    peft is imported only for an adapter: its import costs about a CPU second, paid by every eval gate
    and every job that starts from a full model otherwise."""
    chain = [Path(folder)]
    while is_adapter_folder(chain[-1]):
        if len(chain) > MAX_CHAIN:
            raise ValueError(f"{folder}: adapter bases form a chain longer than {MAX_CHAIN} (a loop?)")
        chain.append(adapter_base(chain[-1]))
    model = AutoModelForCausalLM.from_pretrained(chain[-1], dtype=dtype)
    for adapter in reversed(chain[:-1]):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.requires_grad_(True)  # peft froze the base; a merged model is a plain model again


# --- targets ---------------------------------------------------------------------------------------


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    return (torch.nn.Linear, Conv1D)


def linear_layer_names(model: Any) -> list[str]:
    """Distinct leaf names of the linear layers a LoRA can target (the output head excluded)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, _linear_types()) and module is not head
    }
    return sorted(names)


def resolve_targets(cfg: TrainingConfig, model: Any) -> list[str] | str:
    """``lora_targets`` made concrete: a list of module names, or ``"all-linear"``."""
    if cfg.lora_targets == "all-linear":
        return "all-linear"
    if isinstance(cfg.lora_targets, list):
        return list(cfg.lora_targets)
    model_type = getattr(model.config, "model_type", "")
    if model_type in AUTO_TARGETS:
        return list(AUTO_TARGETS[model_type])
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
    except ImportError:  # a peft that moved it: all linear layers always exist
        PEFT_DEFAULTS = {}
    if model_type in PEFT_DEFAULTS:
        return list(PEFT_DEFAULTS[model_type])
    return "all-linear"


def missing_targets(model: Any, targets: list[str] | str) -> list[str]:
    """Target names no module of the model has (peft's rule: the full name or its last parts)."""
    if isinstance(targets, str):
        return []
    names = [name for name, _ in model.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


# --- the adapter -----------------------------------------------------------------------------------


def wrap(model: Any, cfg: TrainingConfig, base: Path, targets: list[str] | str) -> Any:
    """The model with fresh LoRA adapters (only they train), recording ``base`` as what they apply to."""
    from peft import LoraConfig, get_peft_model

    conv1d = _linear_types()[1]
    fan_in_fan_out = any(
        isinstance(m, conv1d) and (targets == "all-linear" or name.rsplit(".", 1)[-1] in targets)
        for name, m in model.named_modules()
    )
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; float works
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)  # names the base after model.name_or_path: ours is exact
    peft_model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    return peft_model


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """A copy of the adapter's weights (the rollback target of a LoRA run with no checkpoint yet)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: Any, state: dict[str, torch.Tensor], source: str = "") -> None:
    """Put adapter weights (as saved by peft) back into a wrapped model, in place; all must fit."""
    from peft import set_peft_model_state_dict

    result: Any = set_peft_model_state_dict(model, state)  # torch's IncompatibleKeys
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{source or 'adapter'}: weights do not match the model "
            f"(missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]})"
        )


def load_adapter_folder(model: Any, folder: Path) -> None:
    from peft.utils import load_peft_weights

    load_adapter_state(model, load_peft_weights(str(folder), device="cpu"), str(folder))


def saved_bytes(model: Any) -> int:
    """Bytes ``save_pretrained`` writes for a wrapped model: the adapter only."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# --- QLoRA (untested here: needs a CUDA GPU and bitsandbytes) ---------------------------------------


def bitsandbytes_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def load_4bit(folder: Path, device: torch.device) -> Any:
    """The frozen base in NF4 on ``device`` (bf16 compute), prepared for k-bit training."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    index = device.index if device.index is not None else torch.cuda.current_device()
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, device_map={"": index}, dtype=torch.bfloat16
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def export_merged(folder: Path, out: Path) -> None:
    """Write ``folder`` (full or adapter) as one full model (fp32 safetensors) plus its tokenizer."""
    from transformers import AutoTokenizer

    model = load_causal_lm(folder)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
