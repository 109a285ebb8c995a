"""The dashboard against hostile and large homes, in real headless Chromium at 1024, 1400 and 1920 px:
controls inside the viewport and their card, neither clipped nor covered; the versions table's last
column whole; a right-to-left override in a file name shown as a code point, not obeyed; 10,000
waiting jobs listed as the first few per queue with counts; a new job's loading state instead of the
previous job's "finished 300 / 300"; chart axes with distinct labels and never below zero for
non-negative series; the Fleet table with an alive, a stale and a stopped host, their lineage leases and roles
(issue 18).

One server and one browser for the module (a home built directly: no daemon). Set
``TRAINBOX_SHOT_DIR`` to keep a screenshot per width for a person to look at.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from management import hosts
from management.db import ModelDB
from management.fleet import HostRecord
from management.leases import LEADER, RETENTION, acquire, claim_job, lineage_lease
from tests.monitoring_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    FAKE_JOB,
    RTL_NAME,
    ServerProc,
    add_many_waiting,
    add_waiting,
    populate,
    write_daemon_status,
    write_training_status,
)
from trainbox.home import Home
from trainbox.states import Priority

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

WIDTHS = [1024, 1400, 1920]
BULK = 10_000
QUEUE_ROWS = 20  # monitoring/static/app.js QUEUE_ROWS
RTL_JOB, LONG_JOB = 20_000, 20_001  # newer than the bulk jobs: in "Recent jobs" too
LONG_NAME = "a-rather-long-file-name-that-goes-on-and-on-2024-06-11-final-final-v2.jsonl"

# Why an element is not fully usable: outside the viewport or its card, cut by an ancestor that
# clips, or covered by something else at its centre. Empty when it is fine.
PROBLEMS_JS = """
(el) => {
  el.scrollIntoView({block: "center", inline: "nearest"});
  const r = el.getBoundingClientRect(), out = [];
  const vw = document.documentElement.clientWidth, vh = document.documentElement.clientHeight;
  if (r.width < 4 || r.height < 4) out.push(`too small: ${r.width}x${r.height}`);
  if (r.left < 0 || r.right > vw) out.push(`outside the viewport: ${r.left}..${r.right} of ${vw}`);
  if (r.top < 0 || r.bottom > vh) out.push(`outside the viewport vertically: ${r.top}..${r.bottom} of ${vh}`);
  const card = el.closest(".card, header");
  if (card) {
    const c = card.getBoundingClientRect();
    if (r.left < c.left || r.right > c.right || r.top < c.top || r.bottom > c.bottom)
      out.push(`outside its card: ${r.left}..${r.right} in ${c.left}..${c.right}`);
  }
  for (let a = el.parentElement; a; a = a.parentElement) {
    const s = getComputedStyle(a);
    if (s.overflowX !== "visible" || s.overflowY !== "visible") {
      const c = a.getBoundingClientRect();
      if (r.left < c.left - 0.5 || r.right > c.right + 0.5 || r.top < c.top - 0.5 || r.bottom > c.bottom + 0.5)
        out.push(`clipped by <${a.tagName.toLowerCase()} class="${a.className}">`);
    }
  }
  const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
  if (!hit || !(hit === el || el.contains(hit)))
    out.push(`covered by <${hit ? hit.tagName.toLowerCase() : "nothing"}>`);
  return out;
}
"""

# The x positions of two characters of an element's text as laid out: an obeyed right-to-left
# override puts the later one to the left of the earlier one.
GLYPH_X_JS = """
([el, first, second]) => {
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  let text = "", nodes = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) { nodes.push([n, text.length]); text += n.data; }
  const x = (needle) => {
    const at = text.indexOf(needle);
    if (at < 0) return null;
    const [node, start] = nodes.filter(([, s]) => s <= at).pop();
    const range = document.createRange();
    range.setStart(node, at - start); range.setEnd(node, at - start + 1);
    return range.getBoundingClientRect().left;
  };
  return [x(first), x(second)];
}
"""


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    h = Home(tmp_path_factory.mktemp("home"))
    populate(h, step=40)
    add_waiting(h, RTL_JOB, RTL_NAME, Priority.HIGH)
    add_waiting(h, LONG_JOB, LONG_NAME, Priority.LOW)
    add_many_waiting(h, 1000, BULK)
    db = ModelDB(h.db_url)
    try:
        db.event("admitted", f"admitted {RTL_NAME}", job_id=RTL_JOB)
        now = time.time()
        for name, beat, stopped, state, job in (
            ("alpha", now, None, "training", FAKE_JOB),  # beats every hour: alive for the whole module
            ("beta", now - 100, None, "idle", None),
            ("gamma", now - 50, now - 50, "stopped", None),
        ):
            hosts.insert(
                db,
                HostRecord(
                    name,
                    4000 + len(name),
                    now - 200,
                    beat,
                    1200.0 if name == "alpha" else 5.0,
                    state,
                    job,
                    version="0.1.0",
                    home=f"/srv/{name}",
                    stopped_at=stopped,
                ),
            )
        # alpha holds the running job's lineage and leads; beta's retention deletes, and beta died holding a lineage
        claim = claim_job(db, "alpha", 3600.0, now)
        assert claim is not None and claim.job_id == FAKE_JOB
        for name, holder, ttl, at in ((LEADER, "alpha", 3600.0, now), (RETENTION, "beta", 3600.0, now)):
            assert acquire(db, name, holder, ttl, at) is not None
        assert acquire(db, lineage_lease("chat"), "beta", 5.0, now - 100) is not None
    finally:
        db.close()
    return h


@pytest.fixture(scope="module")
def server(home: Home) -> Iterator[ServerProc]:
    with ServerProc(home) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


PAGE_ERRORS: list[str] = []


def open_page(browser: Any, server: ServerProc, width: int) -> Any:
    """A page at ``width`` px with the queue and versions loaded; script errors go to PAGE_ERRORS."""
    PAGE_ERRORS.clear()
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.on("pageerror", lambda e: PAGE_ERRORS.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function(
        f"document.querySelector('#queue-table tr[data-job=\"{RTL_JOB}\"]') !== null"
        " && document.getElementById('models-table').textContent.includes('v2')"
        " && document.querySelector('#fleet-table tr[data-host]') !== null",
        timeout=20_000,
    )
    return page


@pytest.mark.parametrize("width", WIDTHS)
def test_controls_are_visible_and_not_clipped(browser: Any, server: ServerProc, width: int, tmp_path: Path) -> None:
    page = open_page(browser, server, width)
    try:
        targets = [
            "#btn-upload",
            "#upload-priority",
            "#upload-file",
            "#btn-pause",
            "#btn-token",
            '#queue-table tr[data-job="8"] select.job-priority',
            '#queue-table tr[data-job="8"] button.job-cancel',
            f'#queue-table tr[data-job="{LONG_JOB}"] select.job-priority',
            f'#queue-table tr[data-job="{LONG_JOB}"] button.job-cancel',
            "#models-table thead th:last-child",
            "#models-table tbody tr:first-child td:last-child",
            '#fleet-table tr[data-host="alpha"] td:last-child',
            '#fleet-table tr[data-host="alpha"] .badge',
            '#fleet-table tr[data-host="alpha"] td.lineage bdi',
        ]
        problems = {sel: page.eval_on_selector(sel, PROBLEMS_JS) for sel in targets}
        assert {sel: p for sel, p in problems.items() if p} == {}
        # the versions table's VAL column shows its whole text, not an ellipsis
        cut = page.evaluate(
            """[...document.querySelectorAll('#models-table th:last-child, #models-table td:last-child')]
               .filter((c) => c.scrollWidth > c.clientWidth + 1).map((c) => c.textContent)"""
        )
        assert cut == []
        assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        shot = tmp_path / f"dashboard-{width}.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("TRAINBOX_SHOT_DIR"):
            shutil.copyfile(shot, Path(os.environ["TRAINBOX_SHOT_DIR"]) / shot.name)
        assert PAGE_ERRORS == []
    finally:
        page.close()


def test_a_right_to_left_override_is_shown_not_obeyed(browser: Any, server: ServerProc) -> None:
    page = open_page(browser, server, 1400)
    try:
        cell = page.query_selector(f'#queue-table tr[data-job="{RTL_JOB}"] td.name')
        text = cell.text_content()
        assert "\u202e" not in text and "[U+202E]" in text and text.endswith("gnp.exe.jsonl")
        g, p = page.evaluate(GLYPH_X_JS, [cell, "gnp", "p."])
        assert g is not None and p is not None and g < p, (g, p)  # laid out left to right, as stored
        # the measurement itself tells an obeyed override apart: the raw name, in a scratch element
        raw_g, raw_p = page.evaluate(
            """([name, js]) => {
                const div = document.createElement("div");
                div.textContent = name;
                document.body.append(div);
                return eval(js)([div, "gnp", "p."]);
            }""",
            [RTL_NAME, GLYPH_X_JS],
        )
        assert raw_g > raw_p
        for where in ("#jobs-table", "#events-list", "#queue-table"):
            page.wait_for_function(f"document.querySelector('{where}').textContent.includes('[U+202E]')")
            assert "\u202e" not in page.text_content(where)
    finally:
        page.close()


def test_ten_thousand_waiting_jobs_show_as_a_page_with_counts(browser: Any, server: ServerProc, home: Home) -> None:
    page = open_page(browser, server, 1400)
    try:
        rows = page.eval_on_selector_all("#queue-table tr[data-job]", "rows => rows.length")
        assert rows <= 3 * QUEUE_ROWS + 1
        normal = page.eval_on_selector_all(
            "#queue-table tr[data-job] select.job-priority option[selected]",
            "opts => opts.filter(o => o.value === 'normal').length",
        )
        assert normal == QUEUE_ROWS
        more = page.text_content('#queue-table tr.more[data-queue="normal"]')
        assert f"{BULK + 1 - QUEUE_ROWS:,} more" in more
        assert f"normal {BULK + 1:,}" in page.text_content("#queue-counts")
        write_training_status(home, 41)  # and the page still follows the training
        write_daemon_status(home)
        page.wait_for_function("document.getElementById('job-step').textContent.startsWith('41 / 300')")
    finally:
        page.close()


def test_a_new_job_shows_its_loading_state_not_the_last_jobs_end(browser: Any, server: ServerProc, home: Home) -> None:
    page = open_page(browser, server, 1400)
    try:
        write_training_status(home, 300, phase="finished")  # the previous job's last word
        write_daemon_status(home, current_job=6, current_job_name="normal-wait.jsonl", worker_pid=None)
        page.wait_for_function("document.getElementById('job-name').textContent.includes('#6 normal-wait')")
        assert page.text_content("#job-phase") == "loading"
        card = page.text_content("#job-card")
        assert "300 / 300" not in card and "finished" not in card.lower()
        write_training_status(home, 1, job_id=6, job_name="normal-wait.jsonl")  # the new worker reports
        page.wait_for_function("document.getElementById('job-step').textContent.startsWith('1 / 300')")
        assert page.text_content("#job-phase") == "training"
    finally:
        write_training_status(home, 40)
        write_daemon_status(home)
        page.close()
    assert FAKE_JOB == 5


def test_chart_axes_have_distinct_labels_and_stay_non_negative(browser: Any, server: ServerProc) -> None:
    page = open_page(browser, server, 1400)
    try:
        drawn = page.evaluate(
            """() => {
                const out = {};
                const draw = (id, points) => {
                    const c = document.getElementById(id);
                    drawChart(c, [{points: points.map((y, i) => [i + 1, y]), color: "#fff"}]);
                    return {ticks: JSON.parse(c.dataset.yticks), ymin: Number(c.dataset.ymin)};
                };
                // a learning rate that barely moves (3-digit labels read "0.002" five times)
                out.lr = draw("lr-chart", Array.from({length: 50}, (_, i) => 0.002 + i * 4e-7));
                out.tiny = draw("lr-chart", Array.from({length: 50}, (_, i) => 3e-4 + i * 1e-9));
                // a gradient norm from 0 with a spike: 5 % padding would put the axis below 0
                out.grad = draw("gradnorm-chart", [0, 0.01, 12, 0.3, 0.2, 0.1]);
                out.loss = draw("loss-chart", [4.5, 3.2, 2.2]);
                return out;
            }"""
        )
        for name, d in drawn.items():
            assert len(d["ticks"]) >= 2 and len(set(d["ticks"])) == len(d["ticks"]), (name, d)
        assert drawn["grad"]["ymin"] == 0 and all(not t.startswith("-") for t in drawn["grad"]["ticks"])
        assert drawn["loss"]["ymin"] >= 0
    finally:
        page.close()


def test_the_fleet_table_shows_each_hosts_liveness(browser: Any, server: ServerProc) -> None:
    page = open_page(browser, server, 1400)
    try:
        shown = page.eval_on_selector_all(
            "#fleet-table tr[data-host]",
            """rows => rows.map(r => [r.dataset.host, r.querySelector('.badge').textContent, r.cells[3].textContent,
                r.cells[4].textContent, [...r.querySelectorAll('.role')].map(e => e.textContent).join(' ')])""",
        )
        assert shown == [
            ["alpha", "training", f"#{FAKE_JOB}", "main", "leader"],
            ["beta", "stale", "—", "chat", "retention"],
            ["gamma", "stopped", "—", "—", ""],
        ]
        # the lineage's tooltip names the job and the lease; beta's ran out, struck through for another host to take
        alpha = page.get_attribute('#fleet-table tr[data-host="alpha"] td.lineage bdi', "title")
        assert alpha is not None and alpha.startswith(f"job #{FAKE_JOB}, generation 1, ") and alpha.endswith(" left")
        beta = page.query_selector('#fleet-table tr[data-host="beta"] td.lineage bdi')
        assert beta.get_attribute("class") == "expired"
        assert re.fullmatch(r"generation 1, expired \dm \d+s ago", beta.get_attribute("title"))  # 100 s and more
        assert page.text_content("#fleet-counts") == "1 of 3 alive"
        assert PAGE_ERRORS == []
    finally:
        page.close()
