"""Publishing a folder atomically: fill a temp folder beside the target, fsync, rename into place.

Readers (a resuming worker, the daemon picking up ``final/``) see the old folder or the whole new
one, never a half-written one, even across a crash or power loss.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from trainbox.atomic import fsync_dir


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def publish_folder(target: Path, fill: Callable[[Path], None], tmp_prefix: str = ".tmp-") -> Path:
    """Create ``target`` with ``fill(tmp)``, replacing any existing folder of that name."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{tmp_prefix}{target.name}-", dir=parent))
    try:
        fill(tmp)
        fsync_tree(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        if target.exists():  # move the old one aside first: rename cannot replace a non-empty folder
            old = Path(tempfile.mkdtemp(prefix=f"{tmp_prefix}old-{target.name}-", dir=parent))
            os.rename(target, old / target.name)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, target)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
