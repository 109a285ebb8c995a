"""The sibling processes' commands: watchdog, retention, health, up, install-systemd, models list|promote|rollback.

Registered on the main ``trainbox`` app by ``register(app, models_app)`` (called from ``cli/main.py``).
Process packages are imported inside each command, so ``trainbox status`` never loads them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import typer
from rich.table import Table

from cli.common import HomeOpt, JsonOpt, console, settings_or_exit
from trainbox.home import Home
from trainbox.lineage import MAIN


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def watchdog(home: HomeOpt = None) -> None:
    """Run the watchdog in the foreground: restart a dead daemon, kill hung workers, write crash reports."""
    from safety.watchdog import Watchdog
    from trainbox.roles import run_role

    h = Home.resolve(home).ensure()
    settings = settings_or_exit(h)
    _logging()
    run_role(Watchdog(h, settings))


def retention(
    home: HomeOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would go and why; delete nothing.")] = False,
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
) -> None:
    """Delete checkpoints by the retention policy (the only process that does), in the foreground."""
    from management.retention import Retention
    from trainbox.roles import run_role

    h = Home.resolve(home)
    settings = settings_or_exit(h)
    if dry_run:
        r = Retention(h, settings, dry_run=True, report=lambda line: console.print(line, highlight=False))
        r.loop(time.time())
        p = r.last_plan
        assert p is not None
        freed = p.freed / 1e6
        console.print(f"dry run: would delete {len(p.delete)} checkpoint(s), {freed:.1f} MB; keep {len(p.keep)}")
        for path, why in sorted(p.keep.items()):
            console.print(f"keep {path}: {why}", highlight=False)
        r.shutdown()
        return
    h.ensure()
    _logging()
    run_role(Retention(h, settings), once=once)


def health(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Check processes, heartbeats, lock, disk, GPU, DB and queue; exit 0 ok, 1 warning, 2 critical."""
    from safety.checkup import Level, overall, run_checks

    h = Home.resolve(home)
    settings = settings_or_exit(h)
    checks = run_checks(h, settings)
    worst = overall(checks)
    if as_json:
        print(json.dumps({"status": worst.name.lower(), "checks": [c.to_json() for c in checks]}, indent=2))
    else:
        colour = {Level.OK: "green", Level.WARNING: "yellow", Level.CRITICAL: "red"}
        table = Table("check", "status", "detail", title=f"trainbox health: {h.root}")
        for c in checks:
            table.add_row(c.name, f"[{colour[c.level]}]{c.level.name.lower()}[/]", c.detail)
        console.print(table)
        console.print(f"overall: [{colour[worst]}]{worst.name.lower()}[/]")
    raise typer.Exit(int(worst))


def up(home: HomeOpt = None) -> None:
    """Run daemon, watchdog, retention and status server under one foreground supervisor (Ctrl-C stops all)."""
    from cli.supervisor import Supervisor
    from trainbox.config import defaults_toml

    h = Home.resolve(home)
    settings_or_exit(h)  # a bad config fails here, before any child starts
    h.root.mkdir(parents=True, exist_ok=True)
    if not h.config_file.exists():
        h.config_file.write_text(defaults_toml(), encoding="utf-8")
    raise typer.Exit(Supervisor(h, say=lambda line: print(line, flush=True)).run())


def install_systemd(
    home: HomeOpt = None,
    user: Annotated[bool, typer.Option("--user", help="User units (~/.config/systemd/user), not system.")] = False,
    directory: Annotated[Path | None, typer.Option("--dir", help="Write the units here instead.")] = None,
    run_as: Annotated[
        str | None, typer.Option("--run-as", help="Account system units run as (default: the home's owner).")
    ] = None,
    group: Annotated[
        str | None, typer.Option("--group", help="Group system units run as (default: that account's group).")
    ] = None,
    allow_root: Annotated[bool, typer.Option("--allow-root", help="Accept system units that run as root.")] = False,
    protect_home: Annotated[
        str,
        typer.Option(
            "--protect-home",
            help="auto: hide /home, /root, /run/user unless the install or home lives there (then read-only); "
            "read-only: e.g. for model folders under /home; yes: hide them.",
        ),
    ] = "auto",
) -> None:
    """Write systemd units (daemon, watchdog, retention, status server, trainbox.target) for this install and home.

    System units run as the home's owner (never root unless --allow-root), sandboxed: read-only system,
    private /tmp, writable home only."""
    from cli.systemd import UnitError, install, ownership_note, resolve_run_as

    h = Home.resolve(home)
    settings = settings_or_exit(h)
    try:
        if protect_home not in ("auto", "yes", "read-only"):
            raise UnitError(f"--protect-home must be auto, yes or read-only, not {protect_home!r}")
        if user and (run_as or group or allow_root):
            raise UnitError("user units (--user) run as you: --run-as, --group and --allow-root are for system units")
        account = None if user else resolve_run_as(h.root, run_as, group, allow_root)
        written = install(
            h.root,
            user,
            directory,
            run_as=account,
            protect_home=cast(Literal["auto", "yes", "read-only"], protect_home),  # checked above
            worker_stop_timeout=settings.daemon.worker_stop_timeout,
            extra_paths=[settings.training.model, settings.models.eval_file],
        )
    except UnitError as e:
        console.print(f"install-systemd: {e}", style="red", markup=False, highlight=False)
        raise typer.Exit(2) from None
    for path in written:
        console.print(f"wrote {path}", markup=False, highlight=False)
    if account is not None:
        console.print(f"the services run as {account.user}:{account.group}", markup=False, highlight=False)
        note = ownership_note(h.root, account)
        if note:
            console.print(note, style="yellow", markup=False, highlight=False)
    ctl = "systemctl --user" if user else "systemctl"
    console.print(f"then: {ctl} daemon-reload && {ctl} enable --now trainbox.target")


# --- models ---------------------------------------------------------------------------------------


def _db(h: Home) -> Any:
    from management.db import ModelDB

    url = settings_or_exit(h).db.url_for(h.db_url)
    if url == h.db_url and not h.db_file.exists():
        console.print("no model versions yet")
        raise typer.Exit(0)
    return ModelDB(url)


LineageOpt = Annotated[
    str | None, typer.Option("--lineage", help="Only this lineage's versions (default: every lineage).")
]


def models_list(home: HomeOpt = None, as_json: JsonOpt = False, lineage: LineageOpt = None) -> None:
    """Model versions with their parents, the eval gate's verdict, which one is current in each lineage, and
    each version's loss on every job's memory set (issue 17)."""
    from management.memory_matrix import format_matrix, memory_matrix
    from management.versions import current_id

    h = Home.resolve(home)
    db = _db(h)
    names = [lineage] if lineage is not None else db.lineages()
    currents = {name: current_id(h, name) for name in names}
    gates = {g.version_id: g for g in db.gates()}
    rows = []
    for v in db.versions(lineage=lineage):
        g = gates.get(v.id)
        rows.append(
            {
                "version": v.id,
                "lineage": v.lineage,
                "current": v.id == currents.get(v.lineage),
                "parent": v.parent_id,
                "job": v.job_id,
                "val_loss": v.val_loss,
                "gate": None if g is None else ("promoted" if g.promoted else "not promoted"),
                "eval_loss": g.new_loss if g else None,
                "reason": g.reason if g else "",
                "path": v.path,
                "kind": v.kind,
                "adapter_of": v.adapter_of,
            }
        )
    if as_json:
        memory = memory_matrix(db, lineage).as_dict()
        db.close()
        current = currents.get(lineage or MAIN)
        lineages = {name: {"current": currents[name]} for name in names}
        print(json.dumps({"current": current, "lineages": lineages, "versions": rows, "memory": memory}, indent=2))
        return
    matrices = {name: memory_matrix(db, name) for name in names}
    db.close()
    for name in names:
        mine = [r for r in rows if r["lineage"] == name]
        if len(names) > 1 or name != MAIN:
            if not mine:
                continue
            console.print(f"lineage {name}: current version {currents[name] or '-'}", style="bold", markup=False)
        table = Table("version", "parent", "job", "val loss", "eval loss", "gate", "reason")
        for r in mine:
            mark = " (current)" if r["current"] else ""
            table.add_row(
                f"{r['version']}{mark}",
                str(r["parent"] or "-"),
                str(r["job"]),
                "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}",
                "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}",
                r["gate"] or "-",
                r["reason"][:90],
            )
        console.print(table)
        print(format_matrix(matrices[name], currents[name]))


def models_promote(
    version: Annotated[int, typer.Argument(help="Version number to make current.")],
    home: HomeOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Skip the regression check.")] = False,
) -> None:
    """Make a version current, if it does not regress against the current one on models.eval_file."""
    from management.versions import VersionError, promote

    h = Home.resolve(home)
    db = _db(h)
    try:
        verdict = promote(h, db, settings_or_exit(h), version, force)
    except VersionError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    finally:
        db.close()
    console.print(f"version {version} is current: {verdict.reason}")


def models_scores(
    version: Annotated[int, typer.Argument(help="Version number.")],
    home: HomeOpt = None,
) -> None:
    """One version's loss on each job's memory set, and the jobs whose files it was trained on."""
    from management.memory_matrix import format_row, memory_matrix

    h = Home.resolve(home)
    db = _db(h)
    try:
        print(format_row(memory_matrix(db), version))
    finally:
        db.close()


def models_rollback(
    home: HomeOpt = None,
    before_job: Annotated[
        int | None,
        typer.Option("--before-job", help="Make current the last version not trained on this job's file."),
    ] = None,
    lineage: Annotated[str, typer.Option("--lineage", help="Whose current version (--before-job: the job's).")] = MAIN,
) -> None:
    """Make the version that was current before the current one current again (or, with --before-job N, the
    last version of the job's lineage not trained on job N's file; trainbox requeue retrains later files)."""
    from management.versions import VersionError, current_id, rollback, rollback_before_job

    h = Home.resolve(home)
    db = _db(h)
    if before_job is not None and (job := db.job(before_job)) is not None:
        lineage = job.lineage
    before = current_id(h, lineage)
    try:
        v = rollback(h, db, lineage) if before_job is None else rollback_before_job(h, db, before_job)
    except VersionError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    finally:
        db.close()
    console.print(f"rolled back: current version {before} -> {v.id}")


def models_export(
    version: Annotated[int, typer.Argument(help="Version number to export.")],
    home: HomeOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder to write (must not exist; default: <home>/exports/vNNNN).")
    ] = None,
) -> None:
    """Write a version as one full model (safetensors, save_pretrained layout, tokenizer) that plain
    transformers loads: a LoRA version is merged into its base; a full version is copied."""
    import os
    import shutil

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: every base is a local folder
    from core.folders import publish_folder
    from core.lora import export_merged, is_adapter_folder

    h = Home.resolve(home)
    db = _db(h)
    v = db.version(version)
    db.close()
    if v is None:
        console.print(f"[red]no model version {version}[/red]")
        raise typer.Exit(1)
    target = (out or h.root / "exports" / f"v{version:04d}").resolve()
    if target.exists():
        console.print(f"[red]{target} already exists; choose another --out[/red]")
        raise typer.Exit(1)
    target.parent.mkdir(parents=True, exist_ok=True)
    source = Path(v.path)
    adapter = is_adapter_folder(source)

    def fill(tmp: Path) -> None:
        if adapter:
            export_merged(source, tmp)
        else:
            shutil.copytree(source, tmp, dirs_exist_ok=True)

    publish_folder(target, fill, tmp_prefix=".tmp-")
    what = f"merged with its base {v.adapter_of or '(from adapter_config.json)'}" if adapter else "copied"
    console.print(f"version {version} exported to {target} ({what})", highlight=False)


def register(app: typer.Typer, models_app: typer.Typer) -> None:
    app.command()(watchdog)
    app.command()(retention)
    app.command()(health)
    app.command()(up)
    app.command("install-systemd")(install_systemd)
    models_app.command("list")(models_list)
    models_app.command("promote")(models_promote)
    models_app.command("rollback")(models_rollback)
    models_app.command("scores")(models_scores)
    models_app.command("export")(models_export)
