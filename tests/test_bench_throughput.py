"""The pure helpers of scripts/bench_throughput.py: the FLOPs formula MFU rests on, the doc-section
rewrite that must leave other benchmarks' sections alone, and the data that must fill max_length."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_throughput.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_throughput"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_flops_full_is_six_n_plus_attention(bench: ModuleType) -> None:
    # 6N (forward 2, input gradient 2, weight gradient 2) + 12 x layers x seq x width
    assert bench.train_flops_per_token(1000, 0, 2, 8, 16) == 6 * 1000 + 12 * 2 * 16 * 8


def test_flops_lora_frozen_weights_get_no_weight_gradient(bench: ModuleType) -> None:
    full = bench.train_flops_per_token(1000, 0, 0, 0, 0)
    lora = bench.train_flops_per_token(10, 990, 0, 0, 0)
    assert lora == 6 * 10 + 4 * 990
    assert lora < full


def test_linear_params_splits_trainable_and_frozen(bench: ModuleType) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2, bias=False))
    model[2].weight.requires_grad_(False)
    assert bench.linear_params(model) == (12, 6)  # weights only: biases are not matmul elements


DOC = "# Benchmarks\n\n## A\n\na text\n\n## {h}\n\nold numbers\n\n## C\n\nc text\n"


def test_replace_section_keeps_the_others(bench: ModuleType) -> None:
    h = bench.SECTION
    out = bench.replace_section(DOC.format(h=h), h, "new numbers")
    assert out == DOC.format(h=h).replace("old numbers", "new numbers")


def test_replace_section_last_and_absent(bench: ModuleType) -> None:
    h = bench.SECTION
    last = f"# B\n\n## A\n\na\n\n## {h}\n\nold\n"
    assert bench.replace_section(last, h, "new\n") == f"# B\n\n## A\n\na\n\n## {h}\n\nnew\n"
    absent = "# B\n\n## A\n\na\n"
    out = bench.replace_section(absent, h, "new")
    assert out == f"# B\n\n## A\n\na\n\n## {h}\n\nnew\n"
    assert bench.replace_section(out, h, "newer") == f"# B\n\n## A\n\na\n\n## {h}\n\nnewer\n"


def test_paired_ratio_is_the_median_of_round_ratios(bench: ModuleType) -> None:
    assert bench.paired_ratio([2.0, 3.0, 10.0], [1.0, 3.0, 4.0]) == 2.0


def test_bench_records_fill_max_length(bench: ModuleType) -> None:
    from core.embedded import build_tokenizer
    from core.encode import encode_all, prepare_tokenizer

    tok = build_tokenizer()
    prepare_tokenizer(tok)
    records = bench.bench_records(6, 64)
    assert {r.kind for r in records} == {"text", "messages"}
    encoded = encode_all(tok, records, 64)
    assert encoded.dropped == 0
    assert all(len(e.input_ids) == 64 and e.trained_tokens > 0 for e in encoded.examples)
