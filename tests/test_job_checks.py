"""Admission-time job checks (daemon/job_checks.py): settings a machine cannot train, model folders that
are not one, and the GPU count the daemon reads without torch."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.job_checks import (
    bitsandbytes_installed,
    check_job_settings,
    check_model_folder,
    count_visible,
    usable_cpus,
    visible_gpus,
)
from trainbox.config import TrainingConfig

REPO = Path(__file__).resolve().parent.parent


def problems(gpus: int = 0, cpus: int = 4, bitsandbytes: bool | None = None, **settings: Any) -> list[str]:
    return check_job_settings(TrainingConfig(**settings), gpus=gpus, cpus=cpus, bitsandbytes=bitsandbytes)


def test_defaults_pass_with_and_without_gpus() -> None:
    assert problems(gpus=0) == []
    assert problems(gpus=8, cpus=1) == []


def test_cuda_without_a_gpu() -> None:
    (p,) = problems(gpus=0, device="cuda")
    assert p.startswith("device = 'cuda'") and "set device = 'auto'" in p
    assert problems(gpus=1, device="cuda") == []
    assert problems(gpus=0, device="auto") == []  # auto falls back to the CPU


def test_nproc_against_gpus_and_cpus() -> None:
    (p,) = problems(gpus=2, nproc=4)
    assert "nproc = 4" in p and "only 2 GPU(s)" in p and "nproc = 2 or less" in p
    assert problems(gpus=2, nproc=2) == [] and problems(gpus=2, nproc=0) == []
    (p,) = problems(gpus=0, cpus=2, nproc=8)
    assert "nproc = 8" in p and "only 2 CPU(s)" in p
    assert problems(gpus=0, cpus=2, nproc=2) == [] and problems(gpus=0, cpus=1, nproc=0) == []
    (p,) = problems(gpus=4, cpus=2, nproc=3, device="cpu")  # device = cpu: the CPUs count, not the GPUs
    assert "on the CPU" in p and "only 2 CPU(s)" in p
    # device = cuda without a GPU is one problem, not two
    assert len(problems(gpus=0, cpus=64, nproc=4, device="cuda")) == 1


def test_hybrid_needs_one_process() -> None:
    (p,) = problems(gpus=0, cpus=4, engine="hybrid", nproc=2)
    assert "engine = 'hybrid'" in p and "nproc = 2" in p and "set nproc = 1" in p
    (p,) = problems(gpus=4, engine="hybrid", nproc=0)  # 0 is one per GPU: 4 processes
    assert "nproc = 0 (one per GPU: 4)" in p
    assert problems(gpus=0, engine="hybrid", nproc=0) == []


def test_several_hosts_need_a_rendezvous_and_count_as_processes() -> None:
    (p,) = problems(nnodes=2)
    assert "nnodes = 2" in p and "rdzv_endpoint is not set" in p and "set rdzv_endpoint = 'host:port'" in p
    assert "sidecar" in p and "trainbox.toml" in p  # where it may be set
    assert problems(nnodes=2, rdzv_endpoint="10.0.0.5:29400") == []
    (p,) = problems(engine="hybrid", nnodes=2, rdzv_endpoint="10.0.0.5:29400")  # 1 process on each of 2 hosts
    assert "nproc = 1 on nnodes = 2 hosts asks for 2 processes" in p and "nnodes = 1" in p
    (p,) = problems(gpus=2, sharding="fsdp", nproc=1, nnodes=2, rdzv_endpoint="h:1", lora=True)
    assert "LoRA" in p  # sharded across the hosts


def test_fsdp_refusals_need_several_processes() -> None:
    (p,) = problems(gpus=2, sharding="fsdp", nproc=2, lora=True)
    assert "sharding = 'fsdp'" in p and "LoRA" in p and "sharding = 'replicate'" in p
    (p,) = problems(gpus=2, sharding="fsdp", nproc=2, precision="fp16")
    assert "precision = 'fp16'" in p
    assert problems(gpus=0, sharding="fsdp", nproc=1, lora=True) == []  # one process: trains unsharded (a warning)


def test_lora_4bit_bf16_and_targets() -> None:
    (p,) = problems(gpus=0, lora=True, lora_4bit=True)
    assert "lora_4bit = true" in p and "CUDA GPU" in p and "device = 'auto', 0 GPU(s)" in p
    assert problems(gpus=1, lora=True, lora_4bit=True) == []
    assert problems(gpus=1, lora=True, lora_4bit=True, device="cpu") != []
    (p,) = problems(gpus=1, lora_4bit=True)
    assert "needs lora = true" in p
    (p,) = problems(gpus=1, lora=True, lora_4bit=True, bitsandbytes=False)
    assert "bitsandbytes" in p
    (p,) = problems(gpus=0, precision="bf16")
    assert "precision = 'bf16'" in p and "'fp32'" in p
    assert problems(gpus=1, precision="bf16") == []  # whether this GPU has bf16 is the worker's preflight's call
    (p,) = problems(lora=True, lora_targets=[])
    assert "lora_targets = []" in p


def test_every_problem_is_one_sentence_naming_the_fix() -> None:
    everything = problems(
        gpus=0, cpus=1, bitsandbytes=False, device="cuda", nproc=4, engine="hybrid", sharding="fsdp", lora=True
    ) + problems(gpus=0, lora_4bit=True, precision="bf16", nnodes=2)
    assert len(everything) >= 7
    for p in everything:
        assert p.endswith(".") and p.count(". ") == 0 and " = " in p and ("set " in p or "install" in p), p


def _worker_refuses(cfg: TrainingConfig) -> bool:
    """What the worker's preflight refuses on this (GPU-less) machine, before and after loading a model."""
    from core.memory import ModelShape
    from core.preflight import check_lora_setup, check_settings, check_sharding, planned_world

    shape = ModelShape(params=1, trainable=1, hidden=8, intermediate=32, layers=1, heads=1, vocab=8, max_positions=None)
    found = check_sharding(cfg, planned_world(cfg)) + check_lora_setup(cfg, False, True)
    found += check_settings(cfg, shape, cuda=False, bf16_supported=False)
    return any(p.fatal for p in found)


def test_agrees_with_the_worker_preflight_on_the_cpu() -> None:
    """Every combination the worker refuses here is refused at admission, and nothing else is."""
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("compares against the worker's CPU decisions")
    keys = ("engine", "nproc", "sharding", "lora", "lora_4bit", "precision")
    values = (
        ("plain", "hybrid"),
        (0, 1, 2),
        ("replicate", "fsdp"),
        (False, True),
        (False, True),
        ("auto", "bf16", "fp16"),
    )
    for combo in itertools.product(*values):
        cfg = TrainingConfig(**dict(zip(keys, combo, strict=True)))
        ours = check_job_settings(cfg, gpus=0, cpus=64, bitsandbytes=True)
        assert bool(ours) == _worker_refuses(cfg), (combo, ours)


# --- model folders ---------------------------------------------------------------------------------


def _model(folder: Path, config: Any = None, raw: str | None = None) -> Path:
    folder.mkdir(parents=True)
    text = raw if raw is not None else json.dumps(config if config is not None else {"model_type": "llama"})
    (folder / "config.json").write_text(text)
    return folder


def _adapter(folder: Path, base: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"}))
    return folder


def test_empty_model_means_the_current_version() -> None:
    assert check_model_folder("") is None


@pytest.mark.parametrize("name", ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_hub_names_are_refused(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    msg = check_model_folder(name)
    assert msg is not None and msg.startswith("trainbox never downloads: training.model must be a local folder")
    assert repr(name) in msg


def test_missing_file_and_non_model_folders(tmp_path: Path) -> None:
    assert "no such folder" in (check_model_folder(str(tmp_path / "nope")) or "")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    assert "is not a folder" in (check_model_folder(str(tmp_path / "weights.bin")) or "")
    (tmp_path / "empty").mkdir()
    assert "holds no config.json" in (check_model_folder(str(tmp_path / "empty")) or "")
    assert "NUL" in (check_model_folder("models/a\0b") or "")
    long = check_model_folder("/" + "x" * 5000)
    assert long is not None and "cannot be used" in long and len(long) < 400


def test_config_json_must_name_a_model_and_is_never_echoed(tmp_path: Path) -> None:
    secret = "s3cr3t-token-do-not-print"
    cases = {
        "not-json": _model(tmp_path / "a", raw=f"{secret} {{"),
        "array": _model(tmp_path / "b", [secret]),
        "no-kind": _model(tmp_path / "c", {"hidden_size": secret}),
        "not-utf8": _model(tmp_path / "d", raw=""),
    }
    (cases["not-utf8"] / "config.json").write_bytes(b'{"model_type": "\xff' + secret.encode() + b'"}')
    expected = {"not-json": "not valid JSON (line 1", "array": "not a JSON object", "no-kind": "neither model_type"}
    expected["not-utf8"] = "not UTF-8"
    for name, folder in cases.items():
        msg = check_model_folder(str(folder))
        assert msg is not None and expected[name] in msg, (name, msg)
        assert secret not in msg
    assert check_model_folder(str(_model(tmp_path / "ok1", {"model_type": "gpt2"}))) is None
    assert check_model_folder(str(_model(tmp_path / "ok2", {"architectures": ["LlamaForCausalLM"]}))) is None
    assert check_model_folder(str(_model(tmp_path / "bad", {"model_type": "", "architectures": []}))) is not None


def test_hostile_config_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "config.json")  # reading it would block forever
    assert "not a regular file" in (check_model_folder(str(fifo)) or "")
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "config.json").symlink_to("/dev/zero")  # endless
    assert "not a regular file" in (check_model_folder(str(dev)) or "")
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "config.json", "wb") as f:
        f.truncate(17 * 1024**2)  # sparse: costs no disk
    assert "larger than 16 MiB" in (check_model_folder(str(big)) or "")
    deep = _model(tmp_path / "deep", raw="[" * 100_000 + "]" * 100_000)
    assert "is not JSON that can be read" in (check_model_folder(str(deep)) or "")
    link = tmp_path / "link"
    link.symlink_to(_model(tmp_path / "real", {"model_type": "llama"}))  # a symlinked folder is fine (HF caches)
    assert check_model_folder(str(link)) is None


def test_relative_paths_count_from_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _model(tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    assert check_model_folder("models/base") is None
    monkeypatch.chdir(tmp_path / "models")
    msg = check_model_folder("models/base")
    assert msg is not None and "no such folder" in msg and repr(str(tmp_path / "models")) in msg


def test_adapter_folders_follow_their_base(tmp_path: Path) -> None:
    base = _model(tmp_path / "base")
    first = _adapter(tmp_path / "v1", str(base))
    second = _adapter(tmp_path / "v2", "../v1")  # relative to the adapter folder, as core/lora.py reads it
    assert check_model_folder(str(first)) is None and check_model_folder(str(second)) is None
    msg = check_model_folder(str(first), lora_4bit=True)
    assert msg is not None and "lora_4bit" in msg and "models export" in msg
    assert "base folder" in (check_model_folder(str(_adapter(tmp_path / "orphan", str(tmp_path / "gone")))) or "")
    assert "names no base model" in (check_model_folder(str(_adapter(tmp_path / "nobase", ""))) or "")
    _adapter(tmp_path / "loop-a", str(tmp_path / "loop-b"))
    _adapter(tmp_path / "loop-b", str(tmp_path / "loop-a"))
    assert "chain longer than" in (check_model_folder(str(tmp_path / "loop-a")) or "")


def test_a_real_model_folder_passes(embedded: Path) -> None:
    """The embedded tiny model as save_pretrained wrote it."""
    assert check_model_folder(str(embedded)) is None


# --- the machine -------------------------------------------------------------------------------------

UUIDS = ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "GPU-aaaa3333-0000"]
SPECS = [None, "", "0", "1", "2", "3", "0,1,2", "1,0", "0,5,1", "0,0", "-1", "1,-1,0", "x", "1gpu,2", " 1, 2"]
SPECS += ["GPU-bbbb", "GPU-bbbb,GPU-aaaa1", "GPU-aaaa", "GPU-aaaa1,GPU-nope,GPU-bbbb", "GPU-bbbb,GPU-bbbb", "GPU-b,0"]


def test_count_visible_cases() -> None:
    count = {spec: count_visible(spec, UUIDS) for spec in SPECS}
    assert (count[None], count[""], count["0"], count["3"], count["0,1,2"], count["0,5,1"]) == (3, 0, 1, 0, 3, 1)
    assert (count["0,0"], count["-1"], count["1,-1,0"], count["x"], count["1gpu,2"]) == (0, 0, 1, 0, 2)
    assert (count["GPU-bbbb"], count["GPU-aaaa"], count["GPU-aaaa1,GPU-nope,GPU-bbbb"], count["GPU-b,0"]) == (
        1,
        0,
        1,
        1,
    )
    assert count_visible("MIG-1,MIG-2", UUIDS) == 2 and count_visible("0", []) == 0


def test_count_visible_agrees_with_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's own NVML-based count (what the worker's torch.cuda sees), fed the same devices."""
    torch_cuda = pytest.importorskip("torch.cuda")
    monkeypatch.setattr(torch_cuda, "_raw_device_count_nvml", lambda: len(UUIDS))
    monkeypatch.setattr(torch_cuda, "_raw_device_uuid_nvml", lambda: list(UUIDS))
    for spec in SPECS:
        if spec is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", spec)
        want = torch_cuda._device_count_nvml()
        want = min(want, len(UUIDS))  # unset: torch lists 64 candidate ordinals, trimmed to the devices
        assert count_visible(spec, UUIDS) == want, spec


def _nvml_count() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def test_visible_gpus_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus() == (_nvml_count() or 0)  # no NVML (no driver, no GPU) is 0, not an error
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == 0


@pytest.mark.skipif(not _nvml_count(), reason="needs an NVIDIA GPU and driver")
@pytest.mark.parametrize("spec", [None, "", "0", "0,0", "-1", "99", "uuid"])
def test_visible_gpus_matches_torch_on_a_gpu(spec: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if spec == "uuid":
        import pynvml

        pynvml.nvmlInit()
        raw = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(0))
        pynvml.nvmlShutdown()
        spec = (raw.decode() if isinstance(raw, bytes) else raw)[:12]
    if spec is not None:
        env["CUDA_VISIBLE_DEVICES"] = spec
    code = "import torch, daemon.job_checks as j; print(torch.cuda.device_count(), j.visible_gpus())"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    torch_count, ours = out.stdout.split()
    assert ours == torch_count, (spec, out.stderr[-2000:])


def test_machine_helpers_and_no_torch_in_the_daemon() -> None:
    assert usable_cpus() == len(os.sched_getaffinity(0))
    assert bitsandbytes_installed() == (importlib.util.find_spec("bitsandbytes") is not None)
    code = (
        "import sys, daemon.job_checks as j; j.visible_gpus(); j.bitsandbytes_installed(); "
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
