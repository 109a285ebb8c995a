"""The job report's PNG plots, drawn headless with matplotlib's Agg backend.

matplotlib is imported inside ``draw`` only: it takes about a second, and the report child is the
only process that needs it (never the daemon, whose tick must not block). A series the run did not
record gets no plot, so a job that failed while loading has a report without images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from management.run_series import Series

# fixed margins for the 7 x 3.6 in figure: tight_layout fitted them per plot and took half the drawing's CPU
MARGINS = {"left": 0.14, "right": 0.98, "bottom": 0.14, "top": 0.9}
PLOT_NAMES = ("loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png", "hybrid_skipped.png")


@dataclass(frozen=True)
class Plot:
    file: str
    title: str


def _xy(points: list[tuple[int, float | None]]) -> tuple[list[int], list[float]]:
    kept = [(s, v) for s, v in points if v is not None]
    return [s for s, _ in kept], [v for _, v in kept]


def plan(series: Series) -> list[tuple[Plot, list[tuple[str, list[int], list[float]]], str]]:
    """(plot, [(label, steps, values)], y label) for every plot the series can fill: pure, so which
    plots a run gets is tested without drawing."""
    train = [p for p in series.train if not p.predicted]
    out = []
    loss = _xy([(p.step, p.loss) for p in train])
    val = _xy([(e.step, e.val_loss) for e in series.evals])
    if loss[0] or val[0]:
        lines = [("training loss", *loss), ("validation loss", *val)]
        out.append((Plot("loss.png", "Loss"), [x for x in lines if x[1]], "loss"))
    for file, title, attr, unit in (
        ("lr.png", "Learning rate", "lr", "learning rate"),
        ("grad_norm.png", "Gradient norm (before clipping)", "grad_norm", "norm"),
        ("tokens_per_s.png", "Throughput", "tokens_per_s", "tokens/s"),
    ):
        xy = _xy([(p.step, getattr(p, attr)) for p in train])
        if xy[0]:
            out.append((Plot(file, title), [(title, *xy)], unit))
    share = _xy([(p.step, p.skipped_share) for p in series.train])
    if share[0]:
        out.append(
            (
                Plot("hybrid_skipped.png", "Hybrid engine: share of each step's examples skipped (no pass)"),
                [("skipped share", *share)],
                "share",
            )
        )
    return out


def draw(series: Series, folder: Path, warning_steps: list[int] | None = None) -> list[Plot]:
    """Write each planned plot into ``folder``; returns those written. Warning steps are marked on the
    loss plot, so a spike in the picture lines up with its line in the report."""
    planned = plan(series)
    if not planned:
        return []  # nothing recorded: not even matplotlib's import
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for plot, lines, unit in planned:
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
        for label, xs, ys in lines:
            style: dict[str, Any] = {"marker": "o", "markersize": 3} if label == "validation loss" else {}
            ax.plot(xs, ys, label=label, linewidth=1.2, **style)
        if plot.file == "loss.png" and warning_steps:
            for i, step in enumerate(sorted(set(warning_steps))[:50]):
                mark = "early warning (see the report)" if i == 0 else None
                ax.axvline(step, color="tab:red", alpha=0.25, linewidth=0.8, label=mark)
        _style(ax, plot.title, unit, len(lines) > 1 or (plot.file == "loss.png" and bool(warning_steps)))
        fig.subplots_adjust(**MARGINS)
        fig.savefig(folder / plot.file)
        plt.close(fig)
        written.append(plot)
    return written


def _style(ax: Any, title: str, unit: str, legend: bool) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(unit)
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend()
