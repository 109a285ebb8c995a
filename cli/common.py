"""What every ``trainbox`` command module shares: the console, the --home/--json options, settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from trainbox.config import ConfigError, Settings, load_settings
from trainbox.home import Home

console = Console()

HomeOpt = Annotated[
    Path | None, typer.Option("--home", help="Instance folder (default: $TRAINBOX_HOME, else the current folder).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def settings_or_exit(home: Home) -> Settings:
    """The home's settings; a bad key or value ends the command with exit code 2, naming it."""
    try:
        return load_settings(home.config_file)
    except ConfigError as e:
        console.print(f"[red]configuration error:[/red] {e}")
        raise typer.Exit(2) from None


def eta(seconds: float | None) -> str:
    """A remaining time for people: 1h05m, 3m20s, or - when unknown."""
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
