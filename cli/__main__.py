"""``python -m cli``: the ``trainbox`` command (how the supervisor, the watchdog and the systemd units
start the daemon, watchdog and retention)."""

from cli.main import main

main()
