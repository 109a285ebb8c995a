"""The embedded tiny model: a ~0.7M-parameter Llama with its own byte-level BPE tokenizer.

trainbox must train something on a machine with no network and no model folder, so it builds a
model from nothing: a tokenizer trained (deterministically) on ``corpus.txt`` shipped beside this
module, and a randomly initialised (seeded) Llama small enough that a few hundred CPU steps take
seconds. It is saved with ``save_pretrained`` so everything downstream treats it like any Hugging
Face model folder. Built once per folder: into a temp folder beside the target, then renamed into
place; a process that loses the race discards its copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = Path(__file__).with_name("corpus.txt")
SEED = 1234
VOCAB_SIZE = 1024
BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

# ChatML. The assistant turn ends with <|im_end|>, which is also the generation stop token.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MODEL_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}


def build_tokenizer(corpus: Path = CORPUS, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE: any UTF-8 text encodes (no unknown tokens), merges from corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus.read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = SEED) -> LlamaForCausalLM:
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert isinstance(im_end, int)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        # generation stops at the end of an assistant turn as well as at end of text
        eos_token_id=[tokenizer.eos_token_id, im_end],
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def ensure_embedded_model(path: Path) -> Path:
    """The embedded model's folder, building it first if it does not exist yet."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the model is not a secret
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "config.json").exists():
                raise
            # another process won the race: its copy is identical, keep it
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return path
