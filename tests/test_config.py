"""Configuration: defaults documented for every key, bad keys and values refused by name."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from trainbox.config import (
    ConfigError,
    DaemonConfig,
    HybridConfig,
    ServerConfig,
    Settings,
    TrainingConfig,
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
    assert tomllib.loads(uncommented)["training"]["hybrid"]["horizons"] == [5, 10, 20]


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


def test_job_config_layers_sidecar_over_instance() -> None:
    base = TrainingConfig(learning_rate=0.01, batch_size=16)
    merged = job_training_config(base, {"batch_size": 2, "priority": "low"})
    assert (merged.learning_rate, merged.batch_size) == (0.01, 2)


def test_hybrid_settings_layer_per_key(tmp_path: Path) -> None:
    """[training.hybrid] in trainbox.toml, [hybrid] in a sidecar: the sidecar replaces only the keys it sets."""
    path = tmp_path / "trainbox.toml"
    path.write_text('[training]\nengine = "hybrid"\n[training.hybrid]\nwarmup_steps = 7\nhorizons = [3]\n')
    base = load_settings(path).training
    assert base.engine == "hybrid" and base.hybrid.horizons == (3,)
    side = tmp_path / "job.toml"
    side.write_text("max_steps = 9\n[hybrid]\nfull_steps = 2\n")
    overrides = load_sidecar(side).model_dump(mode="json", exclude_unset=True)
    assert overrides == {"max_steps": 9, "hybrid": {"full_steps": 2}}
    merged = job_training_config(base, overrides)
    assert (merged.hybrid.warmup_steps, merged.hybrid.full_steps, merged.hybrid.horizons) == (7, 2, (3,))
    assert TrainingConfig.model_validate(merged.model_dump(mode="json")) == merged  # as job.json / checkpoints
    side.write_text('[hybrid]\nmethod = "exponential"\nhistory = 2\n')
    with pytest.raises(ConfigError, match="history >= 3"):
        load_sidecar(side)
