"""LoRA and full fine-tunes through a real daemon, versions that record base plus adapter, the eval gate
scoring an adapter version, and ``trainbox models export`` giving a model plain transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from management.db import ModelDB
from tests.e2e_helpers import DaemonProc, cli, make_home, wait_for, write_jsonl
from trainbox.home import Home

pytestmark = pytest.mark.e2e

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
FRUITS = ["apple", "pear", "plum", "cherry", "lemon"]


def chat_rows(n: int) -> list[dict[str, object]]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What colour is the {FRUITS[i % 5]} number {i}?"},
                {"role": "assistant", "content": f"The {FRUITS[i % 5]} is {COLOURS[i % 6]}."},
            ]
        }
        for i in range(n)
    ]


def done(home: Home) -> int:
    return len(list(home.done.glob("*.jsonl")))


def generates(folder: Path) -> str:
    """Load with plain transformers (no peft, no trainbox code) and generate a few tokens."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert not (folder / "adapter_config.json").exists() and any(folder.glob("*.safetensors"))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What colour is the pear?"}], add_generation_prompt=True, return_dict=True
    )
    ids = torch.tensor([prompt["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    return str(tok.decode(out[0, ids.shape[1] :]))


def _gates(home: Home) -> list[object]:
    db = ModelDB(home.db_url)
    try:
        return list(db.gates())
    finally:
        db.close()


def test_lora_then_full_job_on_the_tiny_model(tmp_path: Path, embedded: Path) -> None:
    home = make_home(tmp_path / "home", embedded, max_steps=20, extra='\n[models]\neval_file = "frozen.jsonl"\n')
    write_jsonl(home.root / "frozen.jsonl", chat_rows(12))
    daemon = DaemonProc(home)
    try:
        (home.inbox / "adapter.toml").write_text('lora = true\nlora_r = 4\nlora_targets = "all-linear"\n')
        write_jsonl(home.inbox / "adapter.jsonl", chat_rows(40))
        wait_for(lambda: done(home) == 1, 120, "the LoRA job done")
        write_jsonl(
            home.inbox / "full.jsonl", [{"text": f"The {FRUITS[i % 5]} is {COLOURS[i % 6]}."} for i in range(40)]
        )
        wait_for(lambda: done(home) == 2, 120, "the full job done")
        # the gate is a child the daemon reaps after filing the job: wait for its verdict on v2 too
        wait_for(lambda: len(_gates(home)) == 2, 180, "both versions gated")
        assert not list(home.failed.glob("*"))
    finally:
        assert daemon.stop() == 0, daemon.log_text()

    db = ModelDB(home.db_url)
    v1, v2 = db.versions()
    gates = {g.version_id: g for g in db.gates()}
    db.close()
    assert (v1.kind, v1.adapter_of) == ("adapter", str(home.embedded_model))
    assert (Path(v1.path) / "adapter_model.safetensors").exists() and not (Path(v1.path) / "config.json").exists()
    assert (v2.kind, v2.adapter_of, v2.parent_id) == ("full", "", v1.id)
    assert (Path(v2.path) / "model.safetensors").exists()
    # the full job started from v1 merged, and the gate scored the adapter version v1 on the frozen set
    assert gates[v2.id].current_id == v1.id and gates[v2.id].current_loss is not None, gates[v2.id].reason

    for v in (v1, v2):
        out = tmp_path / f"export-{v.id}"
        res = cli(home, "models", "export", str(v.id), "--out", str(out))
        assert "exported" in res.stdout, res.stdout + res.stderr
        generates(out)
    assert cli(home, "models", "export", "1", "--out", str(tmp_path / "export-1"), check=False).returncode == 1
    listed = json.loads(cli(home, "models", "list", "--json").stdout)["versions"]
    assert [r["kind"] for r in listed] == ["adapter", "full"]


def test_lora_job_on_smollm2_exports_a_model_that_generates(tmp_path: Path, embedded: Path, smollm2: Path) -> None:
    home = make_home(tmp_path / "home", embedded, max_steps=3, lr=1e-3, extra=f'model = "{smollm2}"\n')
    daemon = DaemonProc(home)
    try:
        # packed (padding-free) batches on a real model and template
        sidecar = 'lora = true\nlora_r = 8\nlora_targets = ["q_proj", "v_proj"]\nbatch_size = 2\nmax_length = 64\n'
        sidecar += "packing = true\n"
        (home.inbox / "chat.toml").write_text(sidecar)
        write_jsonl(home.inbox / "chat.jsonl", chat_rows(16))
        wait_for(lambda: done(home) == 1 or list(home.failed.glob("*.error.json")), 120, "the SmolLM2 job to end")
        assert done(home) == 1, [p.read_text() for p in home.failed.glob("*.error.json")]
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    db = ModelDB(home.db_url)
    [v] = db.versions()
    db.close()
    assert (v.kind, v.adapter_of, v.steps) == ("adapter", str(smollm2), 3)
    assert (Path(v.path) / "adapter_model.safetensors").stat().st_size < 5_000_000  # the adapter, not 135M weights
    out = tmp_path / "merged"
    res = cli(home, "models", "export", str(v.id), "--out", str(out))
    assert "exported" in res.stdout, res.stdout + res.stderr
    text = generates(out)
    assert text.strip(), text
