"""Issue 17 end to end, with the default gate settings: a real daemon, real workers and real gate children on
the embedded model. A file that teaches the opposite of an earlier one, its own validation loss fine, is not
promoted, and the verdict names the job it wrecks; an ordinary file in between is promoted; the daemon serves
a pause and admits a file while that gate scores; the CLI shows the version x job matrix, a version's row and
lineage; ``models rollback --before-job`` and ``requeue`` retrain a later file on top of the earlier version."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from management.db import ModelDB
from management.versions import current_id
from tests.e2e_helpers import DaemonProc, cli, make_home, wait_for, write_jsonl
from trainbox.atomic import read_json

pytestmark = pytest.mark.e2e

WORDS = ["apple", "river", "stone", "cloud", "tiger", "bread", "glass", "maple"]
COLORS = ["red", "blue", "green", "white", "black", "pink", "gold", "grey"]


def _mapping(shift: int, repeats: int) -> list[dict[str, str]]:
    """Each word's colour; ``shift`` rotates the colours, so shift 1 teaches the opposite of shift 0. The
    completion is the colour alone, so the loss measures just that choice."""
    pairs = [(w, COLORS[(i + shift) % len(COLORS)]) for i, w in enumerate(WORDS)]
    return [{"prompt": f"The colour of {w} is", "completion": f" {c}"} for _ in range(repeats) for w, c in pairs]


STORIES = [{"text": f"The {a} dog runs to the {p} every day."} for a in ("small", "big", "old") for p in range(16)]


def test_a_file_that_wrecks_an_earlier_job_is_not_promoted_and_an_ordinary_one_is(
    tmp_path: Path, embedded: Path
) -> None:
    home = make_home(tmp_path / "home", embedded, max_steps=40)
    daemon = DaemonProc(home, env={"TRAINBOX_TEST_EVAL_SLEEP": "4"})
    db = ModelDB(home.db_url)

    def run_job(name: str, rows: list[dict[str, str]], n_gates: int) -> None:
        write_jsonl(home.inbox / name, rows)
        wait_for(lambda: len(db.gates()) == n_gates, 240, f"{name} gated")

    try:
        run_job("colours.jsonl", _mapping(0, 6), 1)
        run_job("stories.jsonl", STORIES, 2)
        assert current_id(home) == 2, db.gates(2)[0].reason  # ordinary: promoted
        # replay off for this one file (its sidecar): replayed examples of the first file would hold much of
        # the old colours (measured: its loss 0.46 -> 1.33 with them, a 13 % loss of what it had learned), and
        # this test is about the gate, the second line of defence
        (home.inbox / "opposite.toml").write_text("replay_share = 0\n")
        write_jsonl(home.inbox / "opposite.jsonl", _mapping(1, 6))
        daemon_file = home.status / "daemon.json"
        gating_v3 = "evaluating model version 3"  # not the second gate's message, which may still be on file
        wait_for(lambda: gating_v3 in ((read_json(daemon_file) or {}).get("message") or ""), 240, "the third gate")
        cli(home, "pause")  # served while the gate child scores
        write_jsonl(home.inbox / "later.jsonl", STORIES[:20])
        wait_for(lambda: daemon.status()["daemon"]["state"] == "paused", 30, "pause applied during the gate")
        wait_for(lambda: daemon.status()["queue"]["normal"] == 1, 30, "a file admitted during the gate")
        assert len(db.gates()) == 2  # the gate was still scoring
        wait_for(lambda: len(db.gates()) == 3, 240, "opposite.jsonl gated")
        gate = db.gates(3)[0]
        assert not gate.promoted and current_id(home) == 2
        # the verdict names the earlier job that lost the largest share of what it had learned, and by how much
        assert "forgets an earlier job beyond models.forgetting_tolerance 25%" in gate.reason
        assert re.search(r"job \d \((colours|stories)\.jsonl\): [\d.]+ -> [\d.]+ \(\+\d+% of the ", gate.reason)
        # its own validation loss improved: only the earlier job's memory shows the harm
        assert gate.new_loss is not None and gate.current_loss is not None and gate.new_loss < gate.current_loss

        listed = json.loads(cli(home, "models", "list", "--json").stdout)
        matrix = listed["memory"]
        assert [j["job"] for j in matrix["jobs"]] == [1, 2, 3]
        row3 = next(r for r in matrix["rows"] if r["version"] == 3)
        row2 = next(r for r in matrix["rows"] if r["version"] == 2)
        assert row3["trained_on"] == [1, 2, 3] and row3["losses"]["1"] > row2["losses"]["1"]  # the wrecked job's
        text = cli(home, "models").stdout
        assert "colours.jsonl" in text and "trained on (jobs)" in text
        scores = cli(home, "models", "scores", "3").stdout
        assert "trained on jobs 1, 2, 3" in scores and "colours.jsonl" in scores

        # roll back the stories file: current is the last version not trained on it; requeue retrains it on top
        out = cli(home, "models", "rollback", "--before-job", str(db.version(2).job_id)).stdout  # type: ignore[union-attr]
        assert current_id(home) == 1, out
        cli(home, "requeue", str(db.version(2).job_id))  # type: ignore[union-attr]
        cli(home, "resume")
        filed = (
            "done",
            "failed",
            "rejected",
            "cancelled",
        )  # the gate's row comes first; the daemon files its job in a later tick
        wait_for(
            lambda: len(db.gates()) == 5 and all(j.state in filed for j in db.jobs()),
            300,
            "the later file and the requeued one gated and filed",
        )
        again = [j for j in db.jobs() if j.name == "stories.jsonl"]
        assert len(again) == 2 and again[1].state == "done" and again[1].duplicate_of is None
    finally:
        db.close()
        assert daemon.stop() == 0, daemon.log_text()
