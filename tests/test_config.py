"""Configuration: defaults documented for every key, bad keys and values refused by name."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, get_args, get_origin

import annotated_types
import pytest

from trainbox.config import (
    ConfigError,
    DaemonConfig,
    HybridConfig,
    ModelsConfig,
    RetentionConfig,
    ServerConfig,
    Settings,
    TrainingConfig,
    WatchdogConfig,
    defaults_toml,
    job_training_config,
    load_settings,
    load_sidecar,
)


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(tmp_path / "trainbox.toml") == Settings()


def test_defaults_file_documents_every_key_and_round_trips(tmp_path: Path) -> None:
    text = defaults_toml()
    for model in (DaemonConfig, TrainingConfig, ServerConfig, HybridConfig):
        for name, field in model.model_fields.items():
            if name == "hybrid":  # a sub-table
                assert "\n[training.hybrid]\n" in text
            else:
                assert f"# {name} = " in text, name
            assert field.description, f"{name} has no description"
    uncommented = "\n".join(line[2:] if line.startswith("# ") and " = " in line else line for line in text.splitlines())
    path = tmp_path / "trainbox.toml"
    path.write_text(uncommented)
    assert load_settings(path) == Settings()
    assert tomllib.loads(uncommented)["training"]["learning_rate"] == TrainingConfig().learning_rate
    assert tomllib.loads(uncommented)["training"]["hybrid"]["keep_shares"] == [1.0, 0.6, 0.4, 0.25]


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "trainbox.toml"
    path.write_text("[training]\nlearning_rat = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'training\.learning_rat'"):
        load_settings(path)


def test_bad_value_is_named(tmp_path: Path) -> None:
    path = tmp_path / "trainbox.toml"
    path.write_text("[daemon]\npoll_interval = -1\n")
    with pytest.raises(ConfigError, match=r"daemon.poll_interval: .*greater than 0"):
        load_settings(path)
    path.write_text("[training\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path)


def test_sidecar_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "a.toml"
    toml.write_text('priority = "high"\nmax_steps = 40\nlearning_rate = 0.002\n')
    overrides = load_sidecar(toml)
    assert overrides.model_dump(exclude_unset=True) == {"priority": "high", "max_steps": 40, "learning_rate": 0.002}
    js = tmp_path / "b.json"
    js.write_text('{"batch_size": 4, "eval_file": "val.jsonl"}')
    assert load_sidecar(js).model_dump(exclude_unset=True) == {"batch_size": 4, "eval_file": "val.jsonl"}


def test_sidecar_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("epochz = 2\n")
    with pytest.raises(ConfigError, match=r"c\.toml: unknown key 'epochz'"):
        load_sidecar(bad)
    bad.write_text('priority = "urgent"\n')
    with pytest.raises(ConfigError, match="priority"):
        load_sidecar(bad)


def test_a_rendezvous_endpoint_is_host_and_port(tmp_path: Path) -> None:
    for good in ("", "10.0.0.5:29400", "node-1.example:1", "[::1]:29400", "localhost:65535"):
        assert TrainingConfig(rdzv_endpoint=good).rdzv_endpoint == good
    bad = tmp_path / "d.toml"
    for value in ("10.0.0.5", ":29400", "host:0", "host:65536", "host:port", "a b:1", "http://h:1"):
        bad.write_text(f"nnodes = 2\nrdzv_endpoint = {value!r}\n")
        with pytest.raises(ConfigError, match=r"d\.toml: rdzv_endpoint: .*expected 'host:port'"):
            load_sidecar(bad)
    path = tmp_path / "trainbox.toml"
    path.write_text('[training]\nrdzv_endpoint = "nowhere"\n')
    with pytest.raises(ConfigError, match=r"trainbox\.toml: training\.rdzv_endpoint: .*expected 'host:port'"):
        load_settings(path)


def test_job_config_layers_sidecar_over_instance() -> None:
    base = TrainingConfig(learning_rate=0.01, batch_size=16)
    merged = job_training_config(base, {"batch_size": 2, "priority": "low"})
    assert (merged.learning_rate, merged.batch_size) == (0.01, 2)


def test_hybrid_settings_layer_per_key(tmp_path: Path) -> None:
    """[training.hybrid] in trainbox.toml, [hybrid] in a sidecar: the sidecar replaces only the keys it sets."""
    path = tmp_path / "trainbox.toml"
    path.write_text('[training]\nengine = "hybrid"\n[training.hybrid]\nwarmup_steps = 7\nkeep_shares = [0.5]\n')
    base = load_settings(path).training
    assert base.engine == "hybrid" and base.hybrid.keep_shares == (0.5,)
    side = tmp_path / "job.toml"
    side.write_text("max_steps = 9\n[hybrid]\nfull_steps = 2\n")
    overrides = load_sidecar(side).model_dump(mode="json", exclude_unset=True)
    assert overrides == {"max_steps": 9, "hybrid": {"full_steps": 2}}
    merged = job_training_config(base, overrides)
    assert (merged.hybrid.warmup_steps, merged.hybrid.full_steps, merged.hybrid.keep_shares) == (7, 2, (0.5,))
    assert TrainingConfig.model_validate(merged.model_dump(mode="json")) == merged  # as job.json / checkpoints
    side.write_text("[hybrid]\nhorizons = [5]\n")  # a key of the first design: refused, named
    with pytest.raises(ConfigError, match="horizons"):
        load_sidecar(side)


NUMBER_MODELS = (
    DaemonConfig,
    TrainingConfig,
    HybridConfig,
    ServerConfig,
    WatchdogConfig,
    RetentionConfig,
    ModelsConfig,
)


def _bounds(metadata: list[Any]) -> tuple[bool, bool]:
    return (
        any(isinstance(m, annotated_types.Ge | annotated_types.Gt) for m in metadata),
        any(isinstance(m, annotated_types.Le | annotated_types.Lt) for m in metadata),
    )


def test_every_number_is_bounded_both_ways() -> None:
    """A value with no upper bound ran forever (max_steps), looped (disk_margin_mb) or crashed the worker (seed)."""
    for model in NUMBER_MODELS:
        for name, field in model.model_fields.items():
            if field.annotation in (int, float):
                assert _bounds(field.metadata) == (True, True), f"{model.__name__}.{name}"
            elif get_origin(field.annotation) is tuple:  # hybrid keep_shares: each element and the count
                (element, _) = get_args(field.annotation)
                assert _bounds(get_args(element)[1].metadata) == (True, True), f"{model.__name__}.{name}"
                assert any(isinstance(m, annotated_types.MaxLen) for m in field.metadata), f"{model.__name__}.{name}"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("max_steps = 1000000000000\n", "max_steps"),
        ("disk_margin_mb = 100000000\n", "disk_margin_mb"),
        ("nproc = 1024\n", "nproc"),
        (f"seed = {2**70}\n", "seed"),
        (f"seed = {2**32}\n", "seed"),
        ("seed = -1\n", "seed"),
        ("epochs = inf\n", "epochs"),
        ("nan_max_skips = 26\n", "nan_max_skips"),
        ("[hybrid]\nkeep_floor = nan\n", "hybrid.keep_floor"),
        ("[hybrid]\nkeep_shares = [0]\n", "hybrid.keep_shares.0"),
        ("[hybrid]\nkeep_shares = [1.0, -2.0]\n", "hybrid.keep_shares.1"),
        (f"[hybrid]\nkeep_shares = {[0.5] * 33}\n", "hybrid.keep_shares"),
    ],
)
def test_sidecar_values_out_of_bounds_are_refused_by_name(tmp_path: Path, text: str, key: str) -> None:
    sidecar = tmp_path / "job.toml"
    sidecar.write_text(text)
    with pytest.raises(ConfigError, match=rf"job\.toml: {re.escape(key)}: "):
        load_sidecar(sidecar)


def test_json_sidecar_with_a_huge_seed(tmp_path: Path) -> None:
    sidecar = tmp_path / "job.json"
    sidecar.write_text(f'{{"seed": {2**70}, "max_steps": 5}}')
    with pytest.raises(ConfigError, match=r"job\.json: seed: .*less than 4294967296"):
        load_sidecar(sidecar)


def test_bounds_keep_their_limits_and_the_config_file_valid(tmp_path: Path) -> None:
    cfg = TrainingConfig(max_steps=10_000_000, seed=2**32 - 1, nproc=256, disk_margin_mb=1_000_000, nan_max_skips=25)
    assert (cfg.max_steps, cfg.seed) == (10_000_000, 2**32 - 1)
    assert HybridConfig(warmup_steps=10**9, remeasure_tol=100.0, keep_floor=1.0).warmup_steps == 10**9  # test settings
    path = tmp_path / "trainbox.toml"
    path.write_text("[daemon]\nworker_stop_timeout = 3601\n")
    with pytest.raises(ConfigError, match=r"daemon\.worker_stop_timeout: .*less than or equal to 3600"):
        load_settings(path)


def test_the_largest_seed_seeds_every_generator() -> None:
    """What the worker does with the seed (core/rng.py seed_all, data order, split) works at the bound."""
    pytest.importorskip("torch")
    from core.data import Batches, split_heldout
    from core.rng import seed_all

    largest = TrainingConfig(seed=2**32 - 1).seed
    seed_all(largest)
    seed_all(0)
    assert split_heldout(list(range(20)), 0.2, 256, largest)[1]
    assert sorted(Batches(10, 4, largest).order(3)) == list(range(10))
