"""The spool's renames, the daemon's alone: ``move`` a job's file between queue folders and ``claim``
one from the inbox. What a spool file is called and where a job is (naming, the read-only listing)
lives in ``trainbox/spool.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainbox.atomic import fsync_dir
from trainbox.safefs import check_regular


def move(src: Path, dst_dir: Path, name: str | None = None, sync: bool = True) -> Path:
    """Rename ``src`` into ``dst_dir``, never over an existing file (a numeric suffix is added)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    target = _free_name(dst_dir, name or src.name)
    os.rename(src, target)
    if sync:  # a batch of moves (admission of many files) fsyncs each folder once at its end instead
        fsync_dir(dst_dir)
        if src.parent != dst_dir:
            fsync_dir(src.parent)
    return target


def claim(src: Path, dst_dir: Path, name: str, sync: bool = True) -> Path:
    """Move a file out of the inbox without following a symlink anywhere a stranger could have put
    one: the source's folder is opened with ``O_NOFOLLOW`` and the file renamed relative to it, only
    if ``lstat`` says it is a regular file. Raises ``NotRegularFile`` otherwise."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(src.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        check_regular(os.stat(src.name, dir_fd=fd, follow_symlinks=False))
        target = _free_name(dst_dir, name)
        os.rename(src.name, target, src_dir_fd=fd)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if sync:
        fsync_dir(dst_dir)
    return target


def _free_name(dst_dir: Path, name: str) -> Path:
    target = dst_dir / name
    stem, suffix = target.stem, target.suffix
    n = 1
    while os.path.lexists(target):
        target = dst_dir / f"{stem}.{n}{suffix}"
        n += 1
    return target
