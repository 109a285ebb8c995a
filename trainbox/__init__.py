"""trainbox: shared foundations (home layout, config, atomic files, status, control) and the CLI.

The process packages (daemon, core, safety, management, monitoring) import from here; nothing here
imports from them, so every process can start without pulling in the others.
"""

__version__ = "0.1.0"
