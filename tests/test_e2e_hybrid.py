"""The hybrid engine end to end (issue 3): a job whose sidecar says ``engine = "hybrid"`` trains through the
real daemon and worker with the shipped [training.hybrid] defaults, ends no more than 2% worse in validation
loss than a plain job of the same steps on the same data from the same model, and its metrics, status file
and DB events record the phases and the jumps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import _engine_note
from management.db import ModelDB
from tests.e2e_helpers import DaemonProc, make_home, metrics, wait_for
from trainbox.status import TrainingStatus, read_status

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STEPS = 60


def test_hybrid_job_matches_plain_and_records_its_phases(tmp_path: Path, embedded: Path) -> None:
    home = make_home(tmp_path / "home", embedded, max_steps=STEPS)
    rows = [json.loads(x) for x in (EXAMPLES / "stories.jsonl").read_text().splitlines()]
    start = f"model = {json.dumps(str(home.embedded_model))}\n"  # both from the same weights, not continual
    (home.inbox / "plain.toml").write_text(start)
    (home.inbox / "hybrid.toml").write_text(
        # the shipped [training.hybrid] defaults (first jump after 30 real steps) but the overhead budget, which
        # compares measured times (a test must not depend on them)
        start + 'engine = "hybrid"\n[hybrid]\nmax_overhead = 1e6\n'
    )
    # the same records; the hybrid file's bytes differ (compact JSON) so it is not refused as a duplicate
    (home.inbox / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    daemon = DaemonProc(home)
    try:
        queued = ("high", "normal", "low", "processing", "done")
        wait_for(lambda: sum(daemon.status()["queue"][k] for k in queued) == 1, 30, "the plain job admitted first")
        (home.inbox / "hybrid.jsonl").write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
        wait_for(lambda: len(list(home.done.glob("*.jsonl"))) == 2, 180, "both jobs done")
        assert not list(home.failed.glob("*.jsonl"))
    finally:
        assert daemon.stop() == 0, daemon.log_text()

    db = ModelDB(home.db_url)
    try:
        jobs = {j.name: j.id for j in db.jobs()}
        plain, hybrid = metrics(home.run_dir(jobs["plain.jsonl"])), metrics(home.run_dir(jobs["hybrid.jsonl"]))
        p_val = [m["val_loss"] for m in plain if m["kind"] == "eval"][-1]
        h_val = [m["val_loss"] for m in hybrid if m["kind"] == "eval"][-1]
        assert h_val <= 1.02 * p_val, (h_val, p_val)  # no more than 2% worse (better is fine)

        assert all("phase" not in m for m in plain)
        train = [m for m in hybrid if m["kind"] == "train"]
        assert train and all(m["phase"] in ("warmup", "full", "predict", "plain") for m in train)
        assert {"warmup", "full"} <= {m["phase"] for m in train}
        assert all(m["predicted"] == (m["phase"] == "predict") for m in train)
        assert [m["step"] for m in train] == sorted({m["step"] for m in train}) and train[-1]["step"] == STEPS
        jumps = [m for m in hybrid if m["kind"] == "hybrid_jump"]
        assert jumps and all(isinstance(j["accepted"], bool) and "probe_after" in j for j in jumps)
        assert len([m for m in train if m["predicted"]]) == len([j for j in jumps if j["advanced"] > 0])

        assert all({"backward_skipped", "time_saved_s", "speedup_estimate"} <= m.keys() for m in train)
        events = db.events(job_id=jobs["hybrid.jsonl"])
        assert len([e for e in events if e.kind == "hybrid_jump"]) == len(jumps)
        # the run's record: jumps tried and accepted, backward passes skipped, estimated time saved (or lost)
        [summary] = [e.data for e in events if e.kind == "hybrid_summary"]
        assert summary["attempts"] == len(jumps) and summary["accepted"] == len([j for j in jumps if j["accepted"]])
        assert summary["backward_skipped"] == train[-1]["backward_skipped"]
        assert summary["advanced_steps"] == sum(j["advanced"] for j in jumps)
        assert summary["time_saved_s"] == pytest.approx(train[-1]["time_saved_s"], abs=0.5)
        assert summary["overhead_s"] > 0  # probes ran; with no accepted jump the time saved is minus that
        if summary["advanced_steps"] == 0:
            assert summary["time_saved_s"] == pytest.approx(-summary["overhead_s"], abs=1e-3)
        assert [e.data["engine_phase"] for e in events if e.kind == "phase_change"][:2] == ["warmup", "full"]
        assert not [e for e in db.events(job_id=jobs["plain.jsonl"]) if e.kind.startswith(("hybrid", "phase"))]
    finally:
        db.close()

    status = read_status(home.status / "training.json", TrainingStatus)  # the last job's: the hybrid one
    assert status is not None and status.engine == "hybrid" and status.engine_phase
    assert status.speedup_estimate is not None and status.speedup_estimate > 0
    assert status.time_saved_s is not None
    note = _engine_note(status.model_dump(mode="json"))
    assert "engine hybrid: " in note and "time saved " in note
