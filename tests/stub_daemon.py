"""``python tests/stub_daemon.py HOME``: the real daemon process (``Daemon.run``: its lock, signals, loop,
notifier thread) with the stub worker and eval gate of ``tests/daemon_stubs.py``, so a test can SIGKILL a
daemon and start the next one in about a second each, without torch."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's packages

from daemon.main import Daemon
from tests.daemon_stubs import EVALUATE_ENTRY, worker_command
from trainbox.config import load_settings
from trainbox.home import Home


def main(root: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    home = Home(Path(root))
    Daemon(home, load_settings(home.config_file), worker_command, EVALUATE_ENTRY).run()


if __name__ == "__main__":
    main(sys.argv[1])
