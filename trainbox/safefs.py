"""Opening and naming files that other people put in the inbox, without trusting them.

The inbox is written by other users; the daemon often runs as root. So a path found there is never
followed: files are opened with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO must not block the daemon, a
symlink must not lead it outside its home) and kept only if ``fstat`` says they are regular files
with one link; names are turned into printable text before they reach a log, the DB or a page.
"""

from __future__ import annotations

import errno
import os
import stat
import unicodedata
from pathlib import Path
from typing import BinaryIO

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotRegularFile(OSError):
    """A path that is not a plain file of its own: a symlink, FIFO, socket, device, folder or hard link."""


def kind_of(mode: int) -> str:
    """A person's word for what an ``lstat`` mode is."""
    for test, word in (
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISDIR, "folder"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISREG, "regular file"),
    ):
        if test(mode):
            return word
    return "special file"


def check_regular(st: os.stat_result) -> None:
    """Refuse anything but a regular file with a single link (a hard link shares its content with a
    path outside the inbox, which admission must not read or move on anyone's behalf)."""
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"not a regular file but a {kind_of(st.st_mode)}")
    if st.st_nlink > 1:
        raise NotRegularFile(f"a hard link ({st.st_nlink} names for one file): copy the file instead")


def open_regular(path: Path | str, dir_fd: int | None = None) -> BinaryIO:
    """Open a regular file for reading without following a symlink at its last component."""
    try:
        fd = os.open(path, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # a symlink; a socket
            raise NotRegularFile("a symbolic link or special file") from e
        raise
    try:
        check_regular(os.fstat(fd))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def lstat_kind(path: Path) -> str | None:
    """None for a regular single-link file, else what it is (a symlink is never followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    try:
        check_regular(st)
    except NotRegularFile as e:
        return str(e).removeprefix("not a regular file but a ")
    return None


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path``, with every symlink resolved, lies inside ``root`` (also resolved)."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a loop, an unknown ~user
        return False
    return resolved == root.resolve() or root.resolve() in resolved.parents


def display_name(name: str) -> str:
    """A file name as safe, printable text: bytes that are not UTF-8 as ``\\xNN``, control and
    bidirectional-format characters (a right-to-left override turns ``exe.txt`` around) as
    ``\\uNNNN``, and at most 200 characters."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    out = "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") else c for c in text)
    return out if len(out) <= 200 else out[:197] + "..."


def copy_regular(src: Path, dst: Path, max_bytes: int) -> bool:
    """Copy a file opened without following a final symlink; False (and no copy) past ``max_bytes``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open_regular(src) as f, open(dst, "wb") as out:
        copied = 0
        while chunk := f.read(1 << 20):
            copied += len(chunk)
            if copied > max_bytes:
                out.close()
                dst.unlink(missing_ok=True)
                return False
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return True
