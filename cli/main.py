"""The ``trainbox`` command: every process and every control, one typed settings object (STYLE 6)."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.common import HomeOpt, JsonOpt, console, eta, settings_or_exit
from cli.fleet import register as register_fleet
from cli.logs import register as register_logs
from cli.report import register as register_report
from cli.siblings import LineageOpt, models_list
from cli.siblings import register as register_siblings
from trainbox import control
from trainbox.config import Settings, defaults_toml
from trainbox.home import Home
from trainbox.lineage import MAIN, LineageError, check_lineage
from trainbox.spool import Spool, job_id_of
from trainbox.states import Priority
from trainbox.status import (
    DAEMON_STATUS,
    TRAINING_STATUS,
    DaemonStatus,
    TrainingStatus,
    daemon_liveness,
    read_status,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Drop JSONL files in, get trained models out.")
models_app = typer.Typer(help="Model versions.", invoke_without_command=True)
app.add_typer(models_app, name="models")


def _home(home: Path | None) -> Home:
    return Home.resolve(home)


@app.command()
def daemon(home: HomeOpt = None) -> None:
    """Run the daemon in the foreground: watch inbox/, admit, train one job at a time."""
    from daemon.lock import LockHeld
    from daemon.main import Daemon

    h = _home(home)
    settings = settings_or_exit(h)
    h.root.mkdir(parents=True, exist_ok=True)
    if not h.config_file.exists():
        h.config_file.write_text(defaults_toml(), encoding="utf-8")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    # a daemon that stops answering can be asked where it is: `kill -USR1 PID` writes every thread's stack
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        Daemon(h, settings).run()
    except LockHeld as e:
        console.print(f"[red]{e}[/red]", soft_wrap=True, markup=True)  # one line: a path is not cut at a width
        raise typer.Exit(1) from None


@app.command()
def add(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A JSONL file to train.")],
    priority: Annotated[Priority | None, typer.Option(help="high, normal or low.")] = None,
    lineage: Annotated[
        str | None, typer.Option("--lineage", help="The chain of model versions it continues (default: main).")
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Copy a file (and its sidecar, if any) into the inbox; the daemon admits it."""
    h = _home(home).ensure()
    target_dir = h.inbox
    if lineage is not None and lineage != MAIN:
        try:
            target_dir /= check_lineage(lineage)
        except LineageError as e:
            console.print(f"[red]{e}[/red]")
            raise typer.Exit(2) from None
    target_dir = target_dir / priority.value if priority else target_dir
    for sidecar in (file.with_suffix(".toml"), file.with_suffix(".json")):
        if sidecar.is_file() and sidecar != file:
            _copy_in(sidecar, target_dir)  # first, so it is there when the data file is admitted
    dest = _copy_in(file, target_dir)
    console.print(f"added {file.name} -> {dest.relative_to(h.root)}")


def _copy_in(src: Path, folder: Path) -> Path:
    """Copy under a temporary name the inbox ignores, then rename: the daemon never sees half a file."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / src.name
    n = 1
    while dest.exists():
        dest = folder / f"{src.stem}.{n}{src.suffix}"
        n += 1
    tmp = folder / f".{dest.name}.{os.getpid()}.part"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return dest


def _daemon_alive(status: DaemonStatus | None, settings: Settings) -> bool:
    return daemon_liveness(status, time.time(), settings.daemon.poll_interval) == "up"


def _status_data(h: Home) -> dict[str, Any]:
    settings = settings_or_exit(h)
    d = read_status(h.status / DAEMON_STATUS, DaemonStatus)
    t = read_status(h.status / TRAINING_STATUS, TrainingStatus)
    alive = _daemon_alive(d, settings)
    current = d.current_job if (d and alive) else None
    return {
        "home": str(h.root),
        "daemon": {
            "running": alive,
            "state": (d.state.value if d and alive else "not running"),
            "pid": d.pid if d else None,
            "paused": d.paused if d else False,
            "heartbeat_age_s": round(time.time() - d.heartbeat, 1) if d else None,
        },
        "current_job": t.model_dump(mode="json") if (t and current is not None and t.job_id == current) else None,
        "queue": Spool(h).counts(),
        "pending_controls": [r.describe() for r in control.pending(h.control)],
    }


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _engine_note(job: dict[str, Any]) -> str:
    """The hybrid engine's phase and running speedup estimate, for the job line."""
    if job.get("engine") != "hybrid":
        return ""
    speedup, saved = job.get("speedup_estimate"), job.get("time_saved_s")
    return (
        f"  engine hybrid: {job.get('engine_phase') or '-'}, speedup {_fmt(speedup, '.2f')}x"
        + (f", {job['backward_skipped']} examples skipped" if job.get("backward_skipped") else "")
        + ("" if saved is None else f", time saved {saved:+.1f} s")
        + (
            f", predicted final loss {job['predicted_final']:.4f} at step {job.get('expected_stop')}"
            if job.get("predicted_final") is not None
            else ""
        )
    )


@app.command()
def status(
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="A live display, redrawn until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between redraws with --watch.")] = 1.0,
    count: Annotated[int | None, typer.Option(min=1, hidden=True, help="Stop --watch after N frames.")] = None,
) -> None:
    """Daemon state, the current job's progress, queue counts and pending control requests."""
    if watch:
        from cli.watch import watch as live

        h = _home(home)
        live(lambda: (_status_data(h), [w.path.name for w in Spool(h).waiting()[:5]]), interval, count)
        return
    data = _status_data(_home(home))
    if as_json:
        print(json.dumps(data, indent=2))
        return
    dm = data["daemon"]
    line = f"daemon: {dm['state']}"
    if dm["running"]:
        line += f" (pid {dm['pid']})"
    elif dm["heartbeat_age_s"] is not None:
        line += f" (last heartbeat {dm['heartbeat_age_s']:.0f}s ago)"
    console.print(line)
    job = data["current_job"]
    if job:
        pct = 100.0 * job["step"] / job["total_steps"] if job["total_steps"] else 0.0
        console.print(
            f"job {job['job_id']} {job['job_name']}: {job['phase']} step {job['step']}/{job['total_steps']}"
            f" ({pct:.0f}%)  loss {_fmt(job['loss'])}  val loss {_fmt(job['val_loss'])}"
            f"  tokens/s {_fmt(job['tokens_per_s'], '.0f')}  ETA {eta(job['eta_s'])}  [{job['device']}]"
            + _engine_note(job)
        )
    else:
        console.print("job: none")
    q = data["queue"]
    console.print(
        f"queue: high {q['high']}, normal {q['normal']}, low {q['low']}; processing {q['processing']},"
        f" done {q['done']}, failed {q['failed']}"
    )
    if data["pending_controls"]:
        console.print(f"pending: {', '.join(data['pending_controls'])} (applied when the daemon runs)")


_QUEUE_LIMIT = 20
# Characters a terminal would obey rather than show (Unicode categories Cc, Cf, Cs, Zl, Zp): control
# characters and escape sequences, and the bidirectional overrides and isolates that make
# `invoice<U+202E>lmth.exe` read as something else.
_UNSHOWABLE_CATEGORIES = ("Cc", "Cf", "Cs", "Zl", "Zp")


def _showable(text: object) -> str:
    """``text`` with every character a terminal would act on written as ``<U+XXXX>``."""
    import unicodedata

    return "".join(f"<U+{ord(c):04X}>" if unicodedata.category(c) in _UNSHOWABLE_CATEGORIES else c for c in str(text))


def _queue_rows(h: Home, limit: int | None, recent: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows in dispatch order, at most ``limit`` per priority queue (all with None), then processing,
    failed and done; and how many waiting jobs each queue holds beyond the rows shown."""
    spool = Spool(h)
    rows: list[dict[str, Any]] = []
    more: dict[str, int] = {}
    waiting = spool.waiting()  # one listing per folder, no stat per file: 10,000 files stay cheap
    for p in Priority:
        mine = [w for w in waiting if w.priority is p]
        shown = mine if limit is None else mine[:limit]
        more[p.value] = len(mine) - len(shown)
        rows += [{"job": w.job_id, "where": p.value, "file": w.path.name, "note": ""} for w in shown]
    for path in spool.processing():
        rows.append({"job": job_id_of(path.name), "where": "processing", "file": path.name, "note": ""})
    errors = sorted(h.failed.glob("*.error.json"), key=lambda f: f.stat().st_mtime, reverse=True)
    for f in errors[:recent]:
        err = _error_file(f)
        rows.append({"job": err.get("job_id"), "where": "failed", "file": err.get("file"), "note": err.get("reason")})
    for path in sorted(h.done.glob("*.jsonl"), key=lambda f: f.stat().st_mtime, reverse=True)[:recent]:
        rows.append({"job": job_id_of(path.name), "where": "done", "file": path.name, "note": ""})
    return rows, more


def _error_file(path: Path) -> dict[str, Any]:
    """An error file's fields; one that cannot be read is listed as such rather than ending the listing."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        return {"file": path.name.removesuffix(".error.json"), "reason": "unreadable error file"}
    return data


@app.command("queue")
def queue_cmd(
    home: HomeOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many waiting jobs per priority queue.")] = (
        _QUEUE_LIMIT
    ),
    show_all: Annotated[bool, typer.Option("--all", help="Show every waiting job.")] = False,
    recent: Annotated[int, typer.Option(min=0, help="How many failed and done jobs to show.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Waiting jobs in dispatch order (the first --limit per queue, with counts), the one in processing,
    then failed and recent done ones."""
    from rich.text import Text

    h = _home(home)
    rows, more = _queue_rows(h, None if show_all else limit, recent)
    counts = Spool(h).counts()
    daemon_status = read_status(h.status / DAEMON_STATUS, DaemonStatus)
    refused = daemon_status.inbox_refused if daemon_status else []
    if as_json:
        print(json.dumps({"counts": counts, "more": more, "rows": rows, "inbox_refused": refused}, indent=2))
        return
    console.print(
        "waiting: "
        + ", ".join(f"{p.value} {counts[p.value]}" for p in Priority)
        + f"; processing {counts['processing']}, done {counts['done']}, failed {counts['failed']}",
        markup=False,
    )
    table = Table("job", "where", "file", "note")
    for i, r in enumerate(rows):
        # Text, not str: a name or reason containing [brackets] is not rich markup
        cells = (str(r["job"]), r["where"], _showable(r["file"] or ""), _showable(r["note"] or "")[:100])
        table.add_row(*(Text(c) for c in cells))
        ends_queue = i + 1 == len(rows) or rows[i + 1]["where"] != r["where"]
        if ends_queue and more.get(r["where"]):
            table.add_row(Text(""), Text(r["where"]), Text(f"... {more[r['where']]} more (--all to list them)"))
    console.print(table)
    if refused:
        console.print("left in the inbox, never opened or moved:", markup=False)
        for line in refused:
            console.print(Text("  " + _showable(line)))


def _control(
    action: control.Action, home: Path | None, job_id: int | None = None, priority: Priority | None = None
) -> None:
    h = _home(home).ensure()
    control.submit(h.control, action, job_id, priority)
    alive = _daemon_alive(read_status(h.status / DAEMON_STATUS, DaemonStatus), settings_or_exit(h))
    when = "now" if alive else "when the daemon next starts"
    console.print(f"{action.value} requested; the daemon applies it {when}")


HostOpt = Annotated[
    str | None, typer.Option("--host", help="A fleet's host (its [fleet] host) instead of this home's daemon.")
]
FleetOpt = Annotated[bool, typer.Option("--fleet", help="Every host of the fleet sharing this home's model DB.")]


def _fleet_control(action: control.Action, home: Path | None, host: str | None, fleet: bool) -> bool:
    """A request for another host or every host goes through the model DB (management/fleet_controls.py);
    False when it addresses this home's daemon (its control/ folder, as always)."""
    if host is None and not fleet:
        return False
    if host is not None and fleet:
        console.print("[red]--host and --fleet: give one[/red]")
        raise typer.Exit(2)
    from management import fleet_controls
    from management.db import ModelDB

    h = _home(home)
    db = ModelDB(settings_or_exit(h).db.url_for(h.db_url))
    try:
        fleet_controls.submit(db, action.value, host or "")
    finally:
        db.close()
    who = f"host {host}" if host else "every host of the fleet"
    console.print(f"{action.value} requested for {who}; each daemon applies it within a heartbeat", markup=False)
    return True


@app.command()
def pause(home: HomeOpt = None, host: HostOpt = None, fleet: FleetOpt = False) -> None:
    """Checkpoint the running job and dispatch nothing until resume."""
    if not _fleet_control(control.Action.PAUSE, home, host, fleet):
        _control(control.Action.PAUSE, home)


@app.command()
def resume(home: HomeOpt = None, host: HostOpt = None, fleet: FleetOpt = False) -> None:
    """Continue: the paused job first, from its checkpoint."""
    if not _fleet_control(control.Action.RESUME, home, host, fleet):
        _control(control.Action.RESUME, home)


@app.command()
def stop(home: HomeOpt = None, host: HostOpt = None, fleet: FleetOpt = False) -> None:
    """Checkpoint the running job, then the daemon exits."""
    if not _fleet_control(control.Action.STOP, home, host, fleet):
        _control(control.Action.STOP, home)


@app.command()
def serve(
    home: HomeOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default: server.host, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: server.port; 0 = any free port).")] = None,
) -> None:
    """Run the status server and dashboard (FastAPI on uvicorn) in the foreground."""
    from monitoring.server import serve as run_server

    h = _home(home)
    settings = settings_or_exit(h)
    if host is not None:
        settings.server.host = host
    if port is not None:
        settings.server.port = port
    run_server(h, settings)


@app.command()
def token(home: HomeOpt = None) -> None:
    """Print the API token that control and upload endpoints require (created on first use, mode 0600)."""
    from monitoring.token import load_or_create_token

    print(load_or_create_token(_home(home).ensure()))


@app.command()
def cancel(job: Annotated[int, typer.Argument(help="Job id (see `trainbox queue`).")], home: HomeOpt = None) -> None:
    """Cancel a job that is waiting, training or paused: its file goes to queue/failed/ marked cancelled
    (a training job's worker checkpoints and stops first; its checkpoints are kept)."""
    _control(control.Action.CANCEL, home, job_id=job)


@app.command()
def requeue(
    jobs: Annotated[list[int], typer.Argument(help="Job ids of trained files (see `trainbox queue`).")],
    home: HomeOpt = None,
) -> None:
    """Put trained jobs' files back into the inbox to train again on top of the current version (after
    `trainbox models rollback --before-job N`), with their settings; not refused as duplicates."""
    from cli.requeue import RequeueError
    from cli.requeue import requeue as requeue_job
    from management.db import ModelDB

    h = _home(home)
    db = ModelDB(settings_or_exit(h).db.url_for(h.db_url))
    try:
        for job in jobs:
            try:
                path = requeue_job(h, db, job)
            except RequeueError as e:
                console.print(f"[red]{e}[/red]")
                raise typer.Exit(1) from None
            console.print(f"job {job}: {path.name} requeued into {path.parent}", highlight=False, markup=False)
    finally:
        db.close()


@app.command()
def prioritize(
    job: Annotated[int, typer.Argument(help="Job id (see `trainbox queue`).")],
    priority: Annotated[Priority, typer.Argument(help="high, normal or low.")],
    home: HomeOpt = None,
) -> None:
    """Move a waiting job to another priority queue."""
    _control(control.Action.PRIORITIZE, home, job_id=job, priority=priority)


@models_app.callback()
def models(ctx: typer.Context, home: HomeOpt = None, as_json: JsonOpt = False, lineage: LineageOpt = None) -> None:
    """Model versions (``list``, the default; ``--lineage X``: one lineage's), ``promote V``, ``rollback``,
    ``export V``."""
    if ctx.invoked_subcommand is None:
        models_list(home=home, as_json=as_json, lineage=lineage)


@app.command("config")
def config_cmd(
    home: HomeOpt = None, check: bool = typer.Option(False, help="Validate the home's trainbox.toml.")
) -> None:
    """Print every configuration key with its default and meaning (or check the home's file)."""
    if check:
        h = _home(home)
        settings_or_exit(h)
        console.print(f"{h.config_file}: ok")
        return
    print(defaults_toml())


register_siblings(app, models_app)  # watchdog, retention, health, up, install-systemd, models ...
register_logs(app)  # trainbox logs [JOB] [-f]
register_report(app)  # report N
register_fleet(app)  # fleet: the daemons sharing the model DB


def main() -> None:
    app()


if __name__ == "__main__":
    main()
