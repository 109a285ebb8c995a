"""The job report's Markdown: a pure function of the gathered facts, the findings and the plots.

Names and messages come from files people dropped and from error text, so every one goes through
``_text`` (printable, Markdown's special characters escaped): a job name cannot turn into a link or
an image on the dashboard's report page. Image links are relative to where the file is read from
(``image_prefix``): the run folder's copy names ``loss.png``, the spool's copy ``../../runs/job-N/``.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

from management.diagnosis import Finding
from management.report_facts import JobFacts
from management.report_plots import Plot
from management.report_sections import JobEnergy, TimeSplit, bottleneck
from trainbox.safefs import display_name

_SPECIAL = re.compile(r"([\\`*\[\]<|])")  # what could make a link, an image, HTML, emphasis or a column


def _text(value: object) -> str:
    return _SPECIAL.sub(r"\\\1", display_name(str(value)).replace("\n", " "))


def _prose(value: str) -> str:
    """Text of the report's own making (no name from outside): Markdown's special characters escaped, never
    cut short as ``_text`` cuts names."""
    return _SPECIAL.sub(r"\\\1", value)


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_num(x) for x in v)
    return _text(v)


def _hybrid(summary: dict[str, Any]) -> list[str]:
    """The hybrid engine's numbers, then the examples it found learned early and never learned, by line."""
    lists = {"learned_early", "never_learned"}
    out = ["## Hybrid engine", "", ", ".join(f"{_text(k)} = {_num(v)}" for k, v in summary.items() if k not in lists)]

    def where(e: dict[str, Any]) -> str:
        return f"line {e['line']}" if e.get("line") is not None else f"example {e.get('example')}"

    early = [e for e in summary.get("learned_early") or [] if isinstance(e, dict)]
    if early:
        out += ["", "Learned early (skipped most): " + ", ".join(f"{where(e)} ({e.get('skips')}x)" for e in early)]
    never = [e for e in summary.get("never_learned") or [] if isinstance(e, dict)]
    if never:
        out += [
            "",
            "Never learned (highest last loss; often the file's bad data): "
            + ", ".join(f"{where(e)} ({_num(e.get('loss'))})" for e in never),
        ]
    return [*out, ""]


def _outcome(f: JobFacts) -> list[str]:
    r = f.result
    lines = [f"# Job {f.job_id}: {_text(f.name)}", "", f"**Outcome: {_text(f.state or 'unknown')}**"]
    if f.error:
        lines[-1] += f": {_text(f.error)}"
    lines.append("")
    rows = [
        ("admitted", _when(f.admitted_at)),
        ("finished", _when(f.finished_at)),
        ("records", str(f.n_records or (f.stats.records if f.stats else "-"))),
    ]
    if r is not None:
        rows.append(("steps", f"{r.step} of {r.total_steps}"))
        rows.append(("final training loss", _num(r.train_loss) if r.train_loss is not None else "-"))
        rows.append(("final validation loss", _num(r.val_loss) if r.val_loss is not None else "-"))
        if r.failure_class:
            rows.append(("failure", f"{_text(r.failure_class)}: {_text(r.message)}"))
        if r.fix:
            rows.append(("fix", _text(r.fix)))
    if f.spool_file is not None:
        rows.append(("file", f"`{_text(f.spool_file.parent.name)}/{_text(f.spool_file.name)}`"))
    lines += ["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows), ""]
    return lines


def _diagnosis(findings: list[Finding], missing: list[str]) -> list[str]:
    lines = ["## Diagnosis", ""]
    if not findings:
        lines.append("No rule fired: nothing in the recorded series points at a setting to change.")
    for x in findings:
        lines.append(f"- **{_text(x.rule)}**: {_text(x.summary)}.  ")
        lines.append(f"  Fix: {_text(x.fix)}.  ")
        lines.append("  Evidence: " + ", ".join(f"{_text(k)} = {_num(v)}" for k, v in x.evidence.items()))
    if missing:
        lines += ["", "Not judged:", *(f"- {_text(m)}" for m in missing)]
    return [*lines, ""]


def _changes(f: JobFacts, diff: list[tuple[str, Any, Any]] | None) -> list[str]:
    lines = ["## What changed from the previous job", ""]
    start = f"version {f.init_version}" if f.init_version is not None else "the base model"
    if f.spec is not None and f.spec.init_model and f.init_version is None:
        start = f"`{_text(f.spec.init_model)}`"
    lines.append(f"- started from: {start}")
    if f.version_id is None:
        lines.append("- produced: no model version")
    else:
        verdict = "gate pending"
        if f.gate is not None:
            verdict = ("promoted to current" if f.gate.promoted else "not promoted") + f" ({_text(f.gate.reason)})"
        lines.append(f"- produced: version {f.version_id}, {verdict}")
    if f.previous is None:
        lines.append("- previous job: none (this is the first job with settings)")
    elif not diff:
        lines.append(f"- settings: the same as job {f.previous.job_id} ({_text(f.previous.name)})")
    else:
        lines += [
            "",
            f"Settings that differ from job {f.previous.job_id} ({_text(f.previous.name)}):",
            "",
            "| setting | previous | this job |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {_text(k)} | {_num(a)} | {_num(b)} |" for k, a, b in diff]
    return [*lines, ""]


def _time(split: TimeSplit, processes: int, device: str) -> list[str]:
    lines = ["## Where the time went", ""]
    lines.append(
        f"Wall-clock {_dur(split.wall_s)} over the job's runs; {split.process_hours:.3f} process-hours "
        f"({processes} process(es), device setting {_text(device)})."
    )
    if split.wall_s > 0:
        lines += ["", "| part | time | share |", "| --- | --- | --- |"]
        lines += [f"| {_text(k)} | {_dur(v)} | {v / split.wall_s:.0%} |" for k, v in split.parts.items()]
    found = bottleneck(split)
    lines += ["", *([f"**{_prose(found)}**", ""] if found else []), *(f"- {_prose(n)}" for n in split.notes)]
    return [*lines, ""]


def _energy(e: JobEnergy | None, currency: str) -> list[str]:
    if e is None:
        return []
    lines = ["## Energy and cost", ""]
    if not e.gpu_hours:
        lines.append("Trained on the CPU: no GPU energy to measure.")
        return [*lines, ""]
    drew = f"{e.kwh:.3f} kWh" if e.kwh is not None else "energy not measured (no NVML energy counter)"
    lines.append(f"{e.gpu_hours:.3f} GPU-hours in the training loops; the GPUs drew {drew}.")
    if e.unmeasured_runs:
        lines.append(f"{e.unmeasured_runs} run(s) could not read the energy counter: not counted.")
    if e.cost is not None:
        lines.append(f"Cost at the `[report]` prices: {e.cost:.2f} {_text(currency)}".rstrip() + ".")
    return [*lines, ""]


def _trackers(f: JobFacts) -> list[str]:
    """Where the job's MLflow and W&B runs are (ids only: a server URI may carry a password)."""
    lines = []
    if f.trackers.mlflow is not None:
        lines.append(f"- MLflow run `{_text(f.trackers.mlflow.run_id)}` (this report is in its artefacts, `report/`)")
    w = f.trackers.wandb
    if w is not None:
        folder = f"runs/{_text(Path(w.dir).name)}/wandb/offline-run-*"  # the run folder the worker gave wandb
        where = f"offline: `wandb sync {folder}`" if w.mode == "offline" else "online"
        lines.append(
            f"- W&B run `{_text(w.run_id)}` in project {_text(w.project)} ({where}; artefact job-{f.job_id}-report)"
        )
    return ["## Trackers", "", *lines, ""] if lines else []


def _warnings(f: JobFacts) -> list[str]:
    if not f.series.warnings:
        return []
    lines = ["## Early warnings during training", ""]
    shown = f.series.warnings[:30]
    lines += [f"- step {w.step}, {_text(w.kind)}: {_text(w.message)}" for w in shown]
    if len(f.series.warnings) > len(shown):
        lines.append(f"- ... and {len(f.series.warnings) - len(shown)} more (metrics.jsonl)")
    return [*lines, ""]


def render(
    facts: JobFacts,
    findings: list[Finding],
    missing: list[str],
    plots: list[Plot],
    diff: list[tuple[str, Any, Any]] | None,
    split: TimeSplit,
    image_prefix: str = "",
    energy: JobEnergy | None = None,
    currency: str = "",
) -> str:
    lines = _outcome(facts) + _diagnosis(findings, missing)
    if plots:
        lines += ["## Plots", ""]
        for p in plots:
            lines += [f"![{_text(p.title)}]({image_prefix}{p.file})", ""]
    lines += _warnings(facts)
    if facts.hybrid:
        lines += _hybrid(facts.hybrid)
    lines += _changes(facts, diff)
    lines += _trackers(facts)
    lines += _time(split, facts.cfg.nproc, facts.cfg.device)
    lines += _energy(energy, currency)
    return "\n".join(lines).rstrip() + "\n"
