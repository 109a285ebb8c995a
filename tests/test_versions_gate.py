"""Model versions: the pure gate, the models/current pointer, promote and rollback; end to end, a job
trained on harmful data is not promoted, rollback restores the previous version, the next job starts
from it."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from management.db import ModelDB, ModelVersion
from management.versions import (
    CURRENT,
    VersionError,
    current_id,
    decide_promotion,
    promote,
    rollback,
    set_current,
    starting_version,
)
from tests.e2e_helpers import DaemonProc, cli, make_home, wait_for, write_jsonl
from trainbox.config import Settings
from trainbox.home import Home


def test_decide() -> None:
    assert decide_promotion(5.0, None, 0.02, None).promoted  # nothing to beat
    assert decide_promotion(1.01, 1.0, 0.02, 3).promoted
    v = decide_promotion(1.05, 1.0, 0.02, 3)
    assert not v.promoted and "regression" in v.reason
    assert not decide_promotion(float("nan"), 1.0, 0.02, 3).promoted
    assert decide_promotion(2.0, None, 0.02, 3).promoted  # current could not be scored


def _fake_versions(home: Home, db: ModelDB, n: int) -> list[ModelVersion]:
    out = []
    for i in range(1, n + 1):
        d = home.models / f"v{i:04d}"
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"w")
        with db.session() as s:
            v = ModelVersion(id=i, path=str(d), parent_id=i - 1 or None)
            s.add(v)
        out.append(v)
    return out


def test_pointer_promote_rollback(tmp_path: Path) -> None:
    home = Home(tmp_path / "home").ensure()
    db = ModelDB(home.db_url)
    _v1, v2, _v3 = _fake_versions(home, db, 3)
    assert current_id(home) is None and starting_version(home, db).id == 3  # type: ignore[union-attr]
    settings = Settings()
    promote(home, db, settings, 1)
    assert os.readlink(home.models / CURRENT) == "v0001" and starting_version(home, db).id == 1  # type: ignore[union-attr]
    promote(home, db, settings, 3)
    promote(home, db, settings, 2)
    assert current_id(home) == 2
    assert rollback(home, db).id == 3 and rollback(home, db).id == 1  # back through the promotion history
    with pytest.raises(VersionError, match="no previous"):
        rollback(home, db)
    (Path(v2.path) / "model.safetensors").unlink()
    with pytest.raises(VersionError, match="not a complete model"):
        promote(home, db, settings, 2)
    with pytest.raises(VersionError):
        set_current(home, v2)
    assert current_id(home) == 1  # a failed switch leaves the pointer alone
    assert [p.action for p in db.promotions()] == ["promote", "promote", "promote", "rollback", "rollback"]
    db.close()


GOOD = [f"the little cat sat on the warm mat number {i % 7} and purred" for i in range(48)]


def _harmful(n: int) -> list[dict[str, str]]:
    rng = random.Random(0)
    alphabet = "qzxjvkwy#@%&*0123456789"
    return [{"text": "".join(rng.choice(alphabet) for _ in range(60))} for _ in range(n)]


@pytest.mark.e2e
def test_harmful_job_not_promoted_rollback_and_next_job_starts_from_current(tmp_path: Path, embedded: Path) -> None:
    home = make_home(tmp_path / "home", embedded, max_steps=20, extra='\n[models]\neval_file = "frozen.jsonl"\n')
    write_jsonl(home.root / "frozen.jsonl", [{"text": t} for t in GOOD[:16]])
    # no replay: the frozen set alone must catch the noise here (replayed good text would mask it on that
    # set; the memory sets' forgetting check catches it then: tests/test_forgetting_e2e.py)
    home.config_file.write_text(home.config_file.read_text().replace("[training]\n", "[training]\nreplay_share = 0\n"))
    daemon = DaemonProc(home)
    db = ModelDB(home.db_url)

    def run_job(name: str, rows: list[dict[str, str]], n_done: int) -> None:
        write_jsonl(home.inbox / name, rows)
        wait_for(lambda: len(list(home.done.glob("*.jsonl"))) == n_done, 120, f"{name} done")
        # a job is filed in done/ once its version exists; the gate (an evaluation child) follows
        wait_for(lambda: len(db.gates()) == n_done, 180, f"{name} gated")

    try:
        run_job("good1.jsonl", [{"text": t} for t in GOOD], 1)
        run_job("good2.jsonl", [{"text": t.replace("cat", "dog")} for t in GOOD], 2)
        assert current_id(home) == 2
        run_job("noise.jsonl", _harmful(48), 3)
        gate = db.gates(3)[0]
        assert not gate.promoted and "regression" in gate.reason and gate.current_id == 2
        assert gate.new_loss is not None and gate.current_loss is not None and gate.new_loss > gate.current_loss
        assert current_id(home) == 2  # kept, not promoted
        noise_job = db.version(3).job_id  # type: ignore[union-attr]
        events = db.events(job_id=noise_job, kind="version_not_promoted")
        assert events and "regression" in events[0].message
        listed = json.loads(cli(home, "models", "list", "--json").stdout)
        assert listed["current"] == 2 and [v["gate"] for v in listed["versions"]][2] == "not promoted"
        refused = cli(home, "models", "promote", "3", check=False)
        assert refused.returncode == 1 and "regression" in refused.stdout
        out = cli(home, "models", "rollback").stdout
        assert "2 -> 1" in out and current_id(home) == 1
        write_jsonl(home.inbox / "next.jsonl", [{"text": t.replace("mat", "rug")} for t in GOOD])
        job = wait_for(
            lambda: next((j for j in db.jobs() if j.name == "next.jsonl" and j.init_model), None), 60, "next job"
        )
        assert job.init_version == 1 and job.init_model == db.version(1).path  # type: ignore[union-attr]
    finally:
        db.close()
        assert daemon.stop() == 0, daemon.log_text()
