"""Hostile inbox input for ``tests/test_fuzz_inbox.py``: a seeded plan of cases and one small builder per
kind of case.

``plan(seed, n)`` is pure (which kinds, in which order); ``build(ctx, idx, kind, seed)`` makes one case,
writing only into the inbox it is given (``make_decoy`` writes only into the decoy folder it is given).
Every case says, per filesystem entry it made, what the daemon must do with it once the inbox has
drained with the daemon paused (``Entry.expect``):

- regular files: ``queued`` (in ``queue/<priority>/``), ``rejected`` (``queue/failed/`` with an error
  file), ``queued_or_rejected``, ``stay`` (left where dropped: the README's ignored names, sidecars with
  no data file), ``stay_or_rejected``, ``any`` (anywhere, but in exactly one place), ``gone`` (deleted by
  the case itself), ``high_or_reported`` (``inbox/HIGH/``: queued high, rejected, or left and reported);
- everything else (symlinks, FIFOs, sockets, folders): ``in_place``: where it was, or in
  ``queue/failed/``, never taken in as a job.

Regular files carry a unique marker (``FZM<idx><label>Z``) so they can be found wherever they end up;
the decoy's files carry ``S3CR3T-...`` markers that must never show up inside the home.
"""

from __future__ import annotations

import json
import os
import random
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PRIORITIES = ("high", "normal", "low")
DECOY_MARK = "S3CR3T-"

QUEUED = "queued"
REJECTED = "rejected"
EITHER = "queued_or_rejected"
STAY = "stay"
STAY_OR_REJECTED = "stay_or_rejected"
ANY = "any"
GONE = "gone"
HIGH_OR_REPORTED = "high_or_reported"
IN_PLACE = "in_place"


@dataclass
class Entry:
    path: bytes
    kind: str  # file | symlink | fifo | socket | dir
    role: str  # data | sidecar | eval | folder
    expect: str
    marker: bytes = b""
    size: int = -1
    records: int | None = None  # a valid data file: how many records admission must count
    priority: str | None = None  # a ``queued`` data file: the queue it must wait in
    target: str = ""  # a symlink's target
    ino: tuple[int, int] | None = None  # (st_dev, st_ino) right after creation

    @property
    def shown(self) -> str:
        return ascii(os.fsdecode(self.path))


@dataclass
class Later:
    """Something a case does after it was dropped (on its own thread): ``delay`` seconds, then ``run()``."""

    delay: float
    run: Callable[[], None]


@dataclass
class Case:
    idx: int
    kind: str
    group: str
    note: str = ""
    entries: list[Entry] = field(default_factory=list)
    later: list[Later] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return f"c{self.idx:04d}"

    @property
    def name(self) -> str:
        return f"{self.tag}-{self.kind}"

    def marker(self, label: str) -> bytes:
        return f"FZM{self.idx:04d}{label}Z".encode()


@dataclass(frozen=True)
class Decoy:
    """A folder outside the home that hostile entries point at; nothing in it may change."""

    root: Path
    markers: dict[str, str]  # marker -> file (relative to root)

    def path(self, rel: str) -> Path:
        return self.root / rel


@dataclass(frozen=True)
class Ctx:
    inbox: Path
    decoy: Decoy
    line_limit: int | None = None  # the daemon's line-length limit, when it has that setting


# --- the decoy -------------------------------------------------------------------------------------

DECOY_DIRS = ("dir", "dir2")
DECOY_FILES = ("secret.jsonl", "passwd", "dir/a.jsonl", "link.jsonl")
DECOY_SIDECARS = ("secret.toml", "secret.json", "badvalue.toml", "dir/c.toml")
DECOY_EVALS = ("eval.jsonl", "secret.jsonl", "dir/sub/d.jsonl")


def make_decoy(root: Path, seed: int) -> Decoy:
    """Files a job, a sidecar or an eval file could be made of, each with its own secret marker; modes
    vary so a chmod shows; ``link.jsonl`` is a symlink inside the decoy."""
    rng = random.Random(f"decoy:{seed}")
    markers: dict[str, str] = {}

    def mark(rel: str) -> str:
        m = f"{DECOY_MARK}{rng.getrandbits(48):012x}"
        markers[m] = rel
        return m

    def jsonl(rel: str) -> str:
        m = mark(rel)
        return "".join(json.dumps({"text": f"{m} private line {k}"}) + "\n" for k in range(12))

    files = {
        "secret.jsonl": (jsonl("secret.jsonl"), 0o600),
        "secret.toml": (f'model = "{mark("secret.toml")}"\n', 0o640),
        "secret.json": (json.dumps({"model": mark("secret.json")}), 0o644),
        "badvalue.toml": (f'priority = "{mark("badvalue.toml")}"\n', 0o600),
        "eval.jsonl": (jsonl("eval.jsonl"), 0o644),
        "passwd": (f"root:{mark('passwd')}:0:0:root:/root:/bin/sh\n", 0o600),
        "dir/a.jsonl": (jsonl("dir/a.jsonl"), 0o644),
        "dir/b.txt": (f"{mark('dir/b.txt')}\n", 0o755),
        "dir/c.toml": (f'model = "{mark("dir/c.toml")}"\n', 0o644),
        "dir/sub/d.jsonl": (jsonl("dir/sub/d.jsonl"), 0o640),
        "dir2/e.jsonl": (jsonl("dir2/e.jsonl"), 0o644),
        "dir2/f.json": (json.dumps({"model": mark("dir2/f.json")}), 0o600),
    }
    for rel, (text, mode) in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        os.chmod(p, mode)
    os.chmod(root / "dir2", 0o750)
    os.symlink("secret.jsonl", root / "link.jsonl")
    return Decoy(root, markers)


# --- helpers ---------------------------------------------------------------------------------------


def _folder(ctx: Ctx, rng: random.Random, root_ok: bool = True) -> tuple[Path, str]:
    """A drop folder and the priority a file dropped there asks for (the root: the default, normal)."""
    p = rng.choice([None, *PRIORITIES] if root_ok else list(PRIORITIES))
    return (ctx.inbox if p is None else ctx.inbox / p), (p or "normal")


def _ino(path: bytes) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def _b(path: Path | bytes) -> bytes:
    return path if isinstance(path, bytes) else os.fsencode(path)


def _records(rng: random.Random, marker: bytes, n: int) -> list[dict[str, object]]:
    m = marker.decode()
    out: list[dict[str, object]] = []
    for j in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        shape = rng.randrange(3)
        if shape == 0:
            out.append({"text": f"{m} the fox jumps over {a} logs, line {j}"})
        elif shape == 1:
            out.append({"prompt": f"{m} what is {a} plus {b}?", "completion": f" {a + b}"})
        else:
            msgs = [{"role": "user", "content": f"{m} say {a}"}, {"role": "assistant", "content": f"{a} {b}"}]
            out.append({"messages": msgs})
    return out


def _jsonl(rows: list[dict[str, object]], sep: str = "\n") -> bytes:
    return "".join(json.dumps(r) + sep for r in rows).encode()


def _file(
    case: Case,
    path: Path | bytes,
    data: bytes,
    expect: str,
    role: str = "data",
    label: str = "d",
    records: int | None = None,
    priority: str | None = None,
) -> Entry:
    """Write a regular file in one go (closed at once) and record it."""
    p = _b(path)
    with open(p, "wb") as f:
        f.write(data)
    marker = case.marker(label)
    e = Entry(p, "file", role, expect, marker if marker in data else b"", len(data), records, priority)
    e.ino = _ino(p)
    case.entries.append(e)
    return e


def _valid(
    case: Case,
    folder: Path,
    name: str | bytes,
    rng: random.Random,
    expect: str = QUEUED,
    priority: str | None = None,
    label: str = "d",
    prefix: bytes = b"",
    sep: str = "\n",
) -> Entry:
    rows = _records(rng, case.marker(label), rng.randint(2, 4))
    path = _b(folder) + b"/" + (name if isinstance(name, bytes) else os.fsencode(name))
    return _file(case, path, prefix + _jsonl(rows, sep), expect, "data", label, len(rows), priority)


def _link(case: Case, path: Path, target: str | Path, role: str = "data") -> Entry:
    p = _b(path)
    os.symlink(target, p)
    e = Entry(p, "symlink", role, IN_PLACE, target=str(target))
    e.ino = _ino(p)
    case.entries.append(e)
    return e


def _special(case: Case, path: Path, kind: str, role: str = "data") -> Entry:
    p = _b(path)
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "dir":
        os.mkdir(p)
    else:  # a unix socket, bound at a short path (108-byte limit) and renamed into place
        short = tempfile.mkdtemp(prefix="fz", dir="/tmp")
        tmp = os.path.join(short, "s")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(tmp)
        finally:
            s.close()
        try:
            os.rename(tmp, p)
        except OSError:  # another filesystem: bind in place if the path is short enough
            os.unlink(tmp)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.bind(p)
            finally:
                s.close()
        os.rmdir(short)
    e = Entry(p, kind, role, IN_PLACE)
    e.ino = _ino(p)
    case.entries.append(e)
    return e


def _sidecar_text(case: Case, rng: random.Random, body: str, label: str = "s") -> tuple[str, bytes]:
    """A sidecar's suffix and bytes: TOML (with the case marker in a comment) or JSON (from ``body``,
    one ``key = value`` TOML line per setting, values in JSON syntax)."""
    if rng.random() < 0.6:
        return ".toml", f"# {case.marker(label).decode()}\n{body}\n".encode()
    data = {}
    for line in body.splitlines():
        key, _, value = line.partition("=")
        data[key.strip()] = json.loads(value.strip())
    return ".json", json.dumps(data).encode()


def _decoy_target(ctx: Ctx, rng: random.Random, choices: tuple[str, ...]) -> Path:
    return ctx.decoy.path(rng.choice(choices))


# --- symlinks --------------------------------------------------------------------------------------


def symlink_job_to_decoy_dir(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    _link(case, folder / f"{case.tag}.jsonl", _decoy_target(ctx, rng, DECOY_DIRS))


def symlink_sidecar_to_decoy_dir(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    _link(case, folder / f"{case.tag}{rng.choice(['.toml', '.json'])}", _decoy_target(ctx, rng, DECOY_DIRS), "sidecar")
    _valid(case, folder, f"{case.tag}.jsonl", rng, EITHER)


def symlink_job_to_decoy_file(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    _link(case, folder / f"{case.tag}.jsonl", _decoy_target(ctx, rng, DECOY_FILES))


def symlink_job_to_decoy_sidecar_file(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    _link(case, folder / f"{case.tag}.jsonl", _decoy_target(ctx, rng, DECOY_SIDECARS))


def symlink_sidecar_to_decoy_file(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    target = _decoy_target(ctx, rng, DECOY_SIDECARS)
    suffix = target.suffix if rng.random() < 0.7 else rng.choice([".toml", ".json"])
    _link(case, folder / f"{case.tag}{suffix}", target, "sidecar")
    _valid(case, folder, f"{case.tag}.jsonl", rng, EITHER)


def symlink_relative_escape(ctx: Ctx, case: Case, rng: random.Random) -> None:
    """Resolves to the decoy from the inbox; dangles (or points elsewhere) once moved into the queue."""
    folder, _ = _folder(ctx, rng)
    target = os.path.relpath(_decoy_target(ctx, rng, ("secret.jsonl", "eval.jsonl", "dir")), folder)
    _link(case, folder / f"{case.tag}.jsonl", target)


def symlink_dangling(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    target = rng.choice([f"/nonexistent-{case.tag}/x.jsonl", f"missing-{case.tag}.jsonl", "../" * 12 + "nope.jsonl"])
    _link(case, folder / f"{case.tag}{rng.choice(['.jsonl', '.toml'])}", target)


def symlink_loop(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    a, b = f"{case.tag}-a.jsonl", f"{case.tag}-b.jsonl"
    _link(case, folder / a, b)
    _link(case, folder / b, a)


def symlink_dev_zero(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    if rng.random() < 0.7:
        _link(case, folder / f"{case.tag}.jsonl", "/dev/zero")
    else:  # as the sidecar of a valid file
        _link(case, folder / f"{case.tag}.toml", "/dev/zero", "sidecar")
        _valid(case, folder, f"{case.tag}.jsonl", rng, EITHER)


def symlink_proc_self_mem(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    if rng.random() < 0.7:
        _link(case, folder / f"{case.tag}.jsonl", "/proc/self/mem")
    else:
        _link(case, folder / f"{case.tag}.json", "/proc/self/mem", "sidecar")
        _valid(case, folder, f"{case.tag}.jsonl", rng, EITHER)


def symlink_folder_in_inbox(ctx: Ctx, case: Case, rng: random.Random) -> None:
    """``inbox/low2 -> decoy/dir``: a folder of the inbox that is really the decoy."""
    name = f"{rng.choice(['low2', 'high2', 'normal-x'])}-{case.tag}"
    _link(case, ctx.inbox / name, _decoy_target(ctx, rng, DECOY_DIRS), "folder")


def symlink_in_priority_folder(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng, root_ok=False)
    target = _decoy_target(ctx, rng, DECOY_FILES + DECOY_DIRS + DECOY_EVALS)
    _link(case, folder / f"{case.tag}.jsonl", target)


def symlink_to_inbox_sibling(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, prio = _folder(ctx, rng)
    _valid(case, folder, f"{case.tag}-real.jsonl", rng, QUEUED, prio)
    _link(case, folder / f"{case.tag}-link.jsonl", f"{case.tag}-real.jsonl")


# --- special files and folders ---------------------------------------------------------------------


def fifo_job(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    _special(case, folder / f"{case.tag}.jsonl", "fifo")


def fifo_sidecar(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    _special(case, folder / f"{case.tag}{rng.choice(['.toml', '.json'])}", "fifo", "sidecar")
    _valid(case, folder, f"{case.tag}.jsonl", rng, EITHER)


def socket_job(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    _special(case, folder / f"{case.tag}.jsonl", "socket")


def dir_named_job(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    d = folder / f"{case.tag}.jsonl"
    _special(case, d, "dir", "folder")
    _valid(case, d, f"inner-{case.tag}.jsonl", rng, ANY, label="i")


def nested_subfolders(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng, root_ok=False)
    sub = folder / f"sub-{case.tag}"
    _special(case, sub, "dir", "folder")
    deeper = sub / "deeper"
    _special(case, deeper, "dir", "folder")
    _valid(case, sub, f"{case.tag}-1.jsonl", rng, ANY, label="a")
    _valid(case, deeper, f"{case.tag}-2.jsonl", rng, ANY, label="b")


def upper_high_folder(ctx: Ctx, case: Case, rng: random.Random) -> None:
    """``inbox/HIGH/``: must not silently mean normal (honoured as high, or reported)."""
    d = ctx.inbox / "HIGH"
    if not d.exists():
        _special(case, d, "dir", "folder")
    _valid(case, d, f"{case.tag}.jsonl", rng, HIGH_OR_REPORTED)


# --- file names ------------------------------------------------------------------------------------


def name_non_utf8(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    junk = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x80abc", b"\xe2\x82"])
    _valid(case, folder, f"{case.tag}-".encode() + junk + b".jsonl", rng, EITHER)


def name_rtl_override(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, prio = _folder(ctx, rng)
    _valid(
        case,
        folder,
        rng.choice([f"{case.tag}-invoice\u202etxt.jsonl", f"\u202e{case.tag}lnosj.exe.jsonl"]),
        rng,
        QUEUED,
        prio,
    )


def name_newline(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, prio = _folder(ctx, rng)
    sep = rng.choice(["\n", "\r\n", "\n\n", "\t", "\x1b[31m"])
    _valid(case, folder, f"{case.tag}{sep}second line.jsonl", rng, QUEUED, prio)


def name_255_bytes(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, prio = _folder(ctx, rng)
    head = f"{case.tag}-"
    if rng.random() < 0.5:
        name = head + "x" * (255 - len(head) - len(".jsonl")) + ".jsonl"
    else:  # multibyte: 2 bytes per character
        n = (255 - len(head) - len(".jsonl")) // 2
        name = head + "\u00e9" * n + ".jsonl"
    _valid(case, folder, name, rng, QUEUED, prio)


def name_leading_dash(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, prio = _folder(ctx, rng)
    _valid(
        case,
        folder,
        rng.choice([f"-{case.tag}.jsonl", f"--{case.tag} -rf .jsonl", f"-n{case.tag}.jsonl"]),
        rng,
        QUEUED,
        prio,
    )


def name_spaces(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, prio = _folder(ctx, rng)
    _valid(
        case,
        folder,
        rng.choice([f" {case.tag} with  spaces .jsonl", f"{case.tag} .jsonl", f"  {case.tag}.jsonl"]),
        rng,
        QUEUED,
        prio,
    )


def name_only_dots(ctx: Ctx, case: Case, rng: random.Random) -> None:
    """``...``: a dotfile, which the README says intake ignores."""
    folder, _ = _folder(ctx, rng)
    n = 3 + case.idx % 240
    while (folder / ("." * n)).exists() and n < 255:
        n += 1
    _valid(case, folder, "." * n, rng, STAY)


def name_ignored(ctx: Ctx, case: Case, rng: random.Random) -> None:
    """Names the README says intake never takes: dotfiles and temp suffixes (a control group)."""
    folder, _ = _folder(ctx, rng)
    name = rng.choice(
        [
            f".{case.tag}.jsonl",
            f"{case.tag}.jsonl.tmp",
            f"{case.tag}.jsonl.part",
            f"{case.tag}.partial",
            f"{case.tag}.jsonl.crdownload",
            f"{case.tag}.jsonl~",
        ]
    )
    _valid(case, folder, name, rng, STAY)


# --- content ---------------------------------------------------------------------------------------


def _content(case: Case, ctx: Ctx, rng: random.Random, data: bytes, expect: str, suffix: str = ".jsonl") -> Entry:
    folder, _ = _folder(ctx, rng)
    return _file(case, folder / f"{case.tag}{suffix}", data, expect)


def _marker_line(case: Case) -> bytes:
    return json.dumps({"text": f"{case.marker('d').decode()} a fine first line"}).encode() + b"\n"


def content_deep_nesting(ctx: Ctx, case: Case, rng: random.Random) -> None:
    depth = rng.randint(100_000, 120_000)
    m = case.marker("d").decode().encode()
    variant = rng.randrange(3)
    if variant == 0:  # unbalanced brackets
        _content(case, ctx, rng, _marker_line(case) + b"[" * depth + b"\n", REJECTED)
    elif variant == 1:  # balanced, under an extra key a validator ignores
        line = b'{"text": "' + m + b'", "x": ' + b"[" * depth + b"]" * depth + b"}\n"
        _content(case, ctx, rng, line, EITHER)
    else:  # nested objects where the text should be
        line = b'{"text": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}\n"
        _content(case, ctx, rng, _marker_line(case) + line, REJECTED)


def content_huge_int(ctx: Ctx, case: Case, rng: random.Random) -> None:
    digits = str(rng.randint(1, 9)) + "".join(str(rng.randrange(10)) for _ in range(rng.randint(5000, 20000)))
    m = case.marker("d").decode()
    if rng.random() < 0.5:
        _content(case, ctx, rng, f'{{"text": "{m}", "n": {digits}}}\n'.encode(), EITHER)
    else:
        _content(case, ctx, rng, _marker_line(case) + f'{{"text": -{digits}}}\n'.encode(), REJECTED)


def content_1e400(ctx: Ctx, case: Case, rng: random.Random) -> None:
    m = case.marker("d").decode()
    big = rng.choice(["1e400", "-1e400", "1E+99999", "NaN", "Infinity", "-Infinity"])
    if rng.random() < 0.5:
        _content(case, ctx, rng, f'{{"text": "{m}", "score": {big}}}\n'.encode(), EITHER)
    else:
        _content(case, ctx, rng, _marker_line(case) + f'{{"text": {big}}}\n'.encode(), REJECTED)


def content_long_line(ctx: Ctx, case: Case, rng: random.Random) -> None:
    """A line above the daemon's line-length limit (with no such setting: a 2 MB line, which is valid)."""
    m = case.marker("d").decode()
    if ctx.line_limit:
        size, expect = ctx.line_limit + rng.randint(1, ctx.line_limit), REJECTED
    else:
        size, expect = 2 * 1024 * 1024 + rng.randint(0, 4096), EITHER
    end = b"\n" if rng.random() < 0.7 else b""
    _content(case, ctx, rng, f'{{"text": "{m} '.encode() + b"a" * size + b'"}' + end, expect)


def content_lone_surrogate(ctx: Ctx, case: Case, rng: random.Random) -> None:
    m = case.marker("d").decode()
    if rng.random() < 0.7:  # a JSON escape of an unpaired surrogate: valid JSON, not valid Unicode
        esc = rng.choice(["\\ud800", "\\udfff", "\\ud800\\ud800", "x\\udbff"])
        _content(case, ctx, rng, f'{{"text": "{m} {esc} end"}}\n'.encode(), EITHER)
    else:  # the surrogate encoded as raw bytes (CESU-8): not UTF-8
        _content(case, ctx, rng, f'{{"text": "{m} '.encode() + b"\xed\xa0\x80" + b' end"}\n', REJECTED)


def content_nul_bytes(ctx: Ctx, case: Case, rng: random.Random) -> None:
    m = case.marker("d").decode()
    variant = rng.randrange(4)
    if variant == 0:
        _content(case, ctx, rng, f'{{"text": "{m} '.encode() + b"\x00\x00" + b'"}\n', REJECTED)
    elif variant == 1:
        _content(case, ctx, rng, _marker_line(case)[:-1] + b"\x00\n", REJECTED)
    elif variant == 2:
        _content(case, ctx, rng, f'{{"text": "{m} \\u0000 escaped"}}\n'.encode(), EITHER)
    else:
        _content(case, ctx, rng, b"\x00" * rng.randint(1, 4096) + case.marker("d") + b"\x00" * 7, REJECTED)


def content_bom_valid(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, prio = _folder(ctx, rng)
    _valid(case, folder, f"{case.tag}.jsonl", rng, QUEUED, prio, prefix=b"\xef\xbb\xbf")


def content_upper_suffix(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, prio = _folder(ctx, rng)
    _valid(case, folder, f"{case.tag}{rng.choice(['.JSONL', '.Jsonl', '.JSONl'])}", rng, QUEUED, prio)


def content_empty(ctx: Ctx, case: Case, rng: random.Random) -> None:
    _content(case, ctx, rng, b"", REJECTED)


def content_whitespace_only(ctx: Ctx, case: Case, rng: random.Random) -> None:
    chars = [" ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\u00a0", "\u2028", "\u3000"]
    text = "".join(rng.choice(chars) for _ in range(rng.randint(1, 200)))
    _content(case, ctx, rng, text.encode(), REJECTED)


def content_binary_garbage(ctx: Ctx, case: Case, rng: random.Random) -> None:
    data = bytearray(rng.randbytes(rng.randint(16, 65536)))
    at = rng.randrange(len(data))
    data[at:at] = case.marker("d")
    _content(case, ctx, rng, bytes(data), REJECTED)


def content_crlf(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, prio = _folder(ctx, rng)
    if rng.random() < 0.7:
        _valid(case, folder, f"{case.tag}.jsonl", rng, QUEUED, prio, sep="\r\n")
    else:  # bare carriage returns: one line to a line reader that splits on \n only
        _valid(case, folder, f"{case.tag}.jsonl", rng, EITHER, sep="\r")


def content_valid(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, prio = _folder(ctx, rng)
    _valid(case, folder, f"{case.tag}.jsonl", rng, QUEUED, prio)


# --- sidecars --------------------------------------------------------------------------------------


def _with_sidecar(
    ctx: Ctx, case: Case, rng: random.Random, sidecar: bytes, suffix: str, expect: str, sidecar_expect: str = ANY
) -> Entry:
    folder, _ = _folder(ctx, rng)
    entry = _file(case, folder / f"{case.tag}{suffix}", sidecar, sidecar_expect, "sidecar", "s")
    _valid(case, folder, f"{case.tag}.jsonl", rng, expect)
    return entry


def sidecar_deep_nesting(ctx: Ctx, case: Case, rng: random.Random) -> None:
    depth = rng.randint(100_000, 120_000)
    variant = rng.randrange(4)
    if variant == 0:
        data, suffix = b"[" * depth, ".json"
    elif variant == 1:
        data, suffix = b'{"max_steps": ' + b"[" * depth + b"]" * depth + b"}", ".json"
    elif variant == 2:
        data, suffix = b"x = " + b"[" * depth + b"]" * depth + b"\n", ".toml"
    else:
        data, suffix = b"a = " + b"{b = " * depth + b"1" + b"}" * depth + b"\n", ".toml"
    _with_sidecar(ctx, case, rng, data, suffix, REJECTED)


def sidecar_non_utf8(ctx: Ctx, case: Case, rng: random.Random) -> None:
    junk = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80"])
    if rng.random() < 0.5:
        data, suffix = b"max_steps = 5\n# " + case.marker("s") + junk + b"\n", ".toml"
    else:
        data, suffix = b'{"model": "' + junk + b'"}', ".json"
    _with_sidecar(ctx, case, rng, data, suffix, REJECTED)


def _eval_sidecar(ctx: Ctx, case: Case, rng: random.Random, eval_file: str, expect: str = REJECTED) -> None:
    suffix, data = _sidecar_text(case, rng, f"eval_file = {json.dumps(eval_file)}")
    _with_sidecar(ctx, case, rng, data, suffix, expect).target = eval_file


def sidecar_eval_absolute_decoy(ctx: Ctx, case: Case, rng: random.Random) -> None:
    _eval_sidecar(ctx, case, rng, str(_decoy_target(ctx, rng, DECOY_EVALS)))


def sidecar_eval_relative_escape(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    target = _decoy_target(ctx, rng, DECOY_EVALS)
    rel = os.path.relpath(target, folder) if rng.random() < 0.6 else "../" * 12 + str(target).lstrip("/")
    suffix, data = _sidecar_text(case, rng, f"eval_file = {json.dumps(rel)}")
    _file(case, folder / f"{case.tag}{suffix}", data, ANY, "sidecar", "s").target = rel
    _valid(case, folder, f"{case.tag}.jsonl", rng, REJECTED)


def sidecar_eval_tilde(ctx: Ctx, case: Case, rng: random.Random) -> None:
    _eval_sidecar(ctx, case, rng, rng.choice([f"~nosuchuser{case.tag}/x.jsonl", f"~/{case.tag}-missing.jsonl", "~"]))


def sidecar_eval_special(ctx: Ctx, case: Case, rng: random.Random) -> None:
    _eval_sidecar(ctx, case, rng, rng.choice(["/dev/zero", "/proc/self/mem", "/proc/self/environ", "/etc", "/"]))


def sidecar_eval_symlink_decoy(ctx: Ctx, case: Case, rng: random.Random) -> None:
    """The eval file beside the sidecar is a symlink to a decoy file."""
    folder, _ = _folder(ctx, rng)
    name = rng.choice([f".{case.tag}-val.jsonl", f"{case.tag}-val.txt"])
    _link(case, folder / name, _decoy_target(ctx, rng, DECOY_EVALS), "eval")
    suffix, data = _sidecar_text(case, rng, f"eval_file = {json.dumps(name)}")
    _file(case, folder / f"{case.tag}{suffix}", data, ANY, "sidecar", "s")
    _valid(case, folder, f"{case.tag}.jsonl", rng, REJECTED)


def sidecar_symlink_to_decoy(ctx: Ctx, case: Case, rng: random.Random) -> None:
    symlink_sidecar_to_decoy_file(ctx, case, rng)


def sidecar_eval_beside(ctx: Ctx, case: Case, rng: random.Random) -> None:
    """The eval file placed beside the sidecar in the inbox: a dotfile intake ignores, or a .jsonl that
    is a job of its own as well. Either way it must end in exactly one place (runs/*/eval.jsonl copies
    do not count as places)."""
    folder, prio = _folder(ctx, rng)
    hidden = rng.random() < 0.5
    name = f".{case.tag}-val.jsonl" if hidden else f"{case.tag}-val.jsonl"
    _valid(case, folder, name, rng, ANY, label="e").role = "eval"  # left, or taken along with its job
    suffix, data = _sidecar_text(case, rng, f"eval_file = {json.dumps(name)}")
    _file(case, folder / f"{case.tag}{suffix}", data, ANY, "sidecar", "s")
    _valid(case, folder, f"{case.tag}.jsonl", rng, QUEUED if hidden else EITHER, prio if hidden else None)


def sidecar_after_file(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    _valid(case, folder, f"{case.tag}.jsonl", rng, QUEUED)
    suffix, data = _sidecar_text(case, rng, f"learning_rate = 0.00{rng.randint(1, 9)}")
    path = folder / f"{case.tag}{suffix}"
    entry = Entry(
        os.fsencode(path), "file", "sidecar", ANY, case.marker("s") if case.marker("s") in data else b"", len(data)
    )
    case.entries.append(entry)

    def drop() -> None:
        path.write_bytes(data)
        entry.ino = _ino(entry.path)

    case.later.append(Later(rng.uniform(0.05, 1.5), drop))


def sidecar_toml_and_json(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    _file(
        case,
        folder / f"{case.tag}.toml",
        f"# {case.marker('s').decode()}\nmax_steps = 7\n".encode(),
        ANY,
        "sidecar",
        "s",
    )
    _file(case, folder / f"{case.tag}.json", b'{"max_steps": 9}', ANY, "sidecar", "t")
    _valid(case, folder, f"{case.tag}.jsonl", rng, EITHER)


ABSURD = (
    "max_steps = 1000000000000",
    f"seed = {2**70}",
    f"seed = -{2**70}",
    "nproc = 1024",
    "disk_margin_mb = 100000000",
    'device = "cuda"',
    'model = "gpt2"',
    'model = "/etc"',
    'model = "../../../../../../etc"',
    'priority = "HIGH"',
    'priority = "urgent"',
    "batch_size = 100000",
    "max_length = 1000000",
    "learning_rate = 1e308",
    "epochs = 1e-300",
    "threads = -1",
    "max_steps = -5",
    'lora_targets = ["' + "x" * 5000 + '"]',
)


def sidecar_absurd_values(ctx: Ctx, case: Case, rng: random.Random) -> None:
    body = "\n".join(rng.sample(ABSURD, rng.randint(1, 3)))
    suffix, data = _sidecar_text(case, rng, body)
    case.note = body.replace("\n", "; ")
    _with_sidecar(ctx, case, rng, data, suffix, EITHER)


def sidecar_without_data(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, _ = _folder(ctx, rng)
    suffix, data = _sidecar_text(case, rng, rng.choice(["max_steps = 3", 'priority = "high"', "learning_rate = 0.001"]))
    _file(case, folder / f"{case.tag}{suffix}", data, STAY_OR_REJECTED, "sidecar", "s")


# --- races -----------------------------------------------------------------------------------------


def race_deleted_after_drop(ctx: Ctx, case: Case, rng: random.Random) -> None:
    """Deleted right after being dropped; if the daemon took it first, it must be in the queue."""
    folder, _ = _folder(ctx, rng)
    entry = _valid(case, folder, f"{case.tag}.jsonl", rng, GONE)

    def delete() -> None:
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            entry.expect = QUEUED
            case.note = "taken by the daemon before the delete"

    case.later.append(Later(rng.uniform(0.0, 0.5), delete))


def race_renamed_from_temp(ctx: Ctx, case: Case, rng: random.Random) -> None:
    folder, prio = _folder(ctx, rng)
    final = f"{case.tag}.jsonl"
    tmp = rng.choice([f"{final}.tmp", f"{final}.part", f".{final}"])
    entry = _valid(case, folder, tmp, rng, QUEUED, prio)
    src, dst = entry.path, os.fsencode(folder / final)
    entry.path = dst

    def rename() -> None:
        os.rename(src, dst)

    case.later.append(Later(rng.uniform(0.0, 0.8), rename))


def race_slow_writer(ctx: Ctx, case: Case, rng: random.Random) -> None:
    """Written in chunks over about 2.5 s (longer than settle_seconds), the file open all along."""
    folder, prio = _folder(ctx, rng)
    chunks = [_jsonl(_records(rng, case.marker("d"), 3)) for _ in range(rng.randint(5, 7))]
    path = os.fsencode(folder / f"{case.tag}.jsonl")
    f = open(path, "wb")  # noqa: SIM115 - closed by the later step
    f.write(chunks[0])
    f.flush()
    entry = Entry(path, "file", "data", QUEUED, case.marker("d"), sum(map(len, chunks)), 3 * len(chunks), prio)
    entry.ino = _ino(path)
    case.entries.append(entry)

    def write_rest() -> None:
        try:
            for chunk in chunks[1:]:
                time.sleep(0.45)
                f.write(chunk)
                f.flush()
        finally:
            f.close()

    case.later.append(Later(0.0, write_rest))


# --- the plan --------------------------------------------------------------------------------------

Builder = Callable[[Ctx, Case, random.Random], None]
BUILDERS: dict[str, tuple[str, Builder]] = {
    f.__name__: (group, f)
    for group, fs in (
        (
            "symlink",
            (
                symlink_job_to_decoy_dir,
                symlink_sidecar_to_decoy_dir,
                symlink_job_to_decoy_file,
                symlink_job_to_decoy_sidecar_file,
                symlink_sidecar_to_decoy_file,
                symlink_relative_escape,
                symlink_dangling,
                symlink_loop,
                symlink_dev_zero,
                symlink_proc_self_mem,
                symlink_folder_in_inbox,
                symlink_in_priority_folder,
                symlink_to_inbox_sibling,
            ),
        ),
        ("special", (fifo_job, fifo_sidecar, socket_job, dir_named_job, nested_subfolders, upper_high_folder)),
        (
            "name",
            (
                name_non_utf8,
                name_rtl_override,
                name_newline,
                name_255_bytes,
                name_leading_dash,
                name_spaces,
                name_only_dots,
                name_ignored,
            ),
        ),
        (
            "content",
            (
                content_deep_nesting,
                content_huge_int,
                content_1e400,
                content_long_line,
                content_lone_surrogate,
                content_nul_bytes,
                content_bom_valid,
                content_upper_suffix,
                content_empty,
                content_whitespace_only,
                content_binary_garbage,
                content_crlf,
                content_valid,
            ),
        ),
        (
            "sidecar",
            (
                sidecar_deep_nesting,
                sidecar_non_utf8,
                sidecar_eval_absolute_decoy,
                sidecar_eval_relative_escape,
                sidecar_eval_tilde,
                sidecar_eval_special,
                sidecar_eval_symlink_decoy,
                sidecar_symlink_to_decoy,
                sidecar_eval_beside,
                sidecar_after_file,
                sidecar_toml_and_json,
                sidecar_absurd_values,
                sidecar_without_data,
            ),
        ),
        ("race", (race_deleted_after_drop, race_renamed_from_temp, race_slow_writer)),
    )
    for f in fs
}


def plan(seed: int, n: int, only: list[str] | None = None) -> list[tuple[int, str]]:
    """``n`` cases as (index, kind): every kind once (when ``n`` allows), then seeded random kinds."""
    kinds = sorted(k for k in BUILDERS if not only or k in only)
    if not kinds:
        raise ValueError(f"no case kind matches {only}; kinds: {', '.join(sorted(BUILDERS))}")
    rng = random.Random(seed)
    first = rng.sample(kinds, len(kinds))[:n]
    rest = [rng.choice(kinds) for _ in range(n - len(first))]
    order = first + rest
    rng.shuffle(order)
    return list(enumerate(order))


def build(ctx: Ctx, idx: int, kind: str, seed: int) -> Case:
    """Make case ``idx`` of ``kind`` in ``ctx.inbox`` (its random choices depend on seed, idx and kind only)."""
    group, builder = BUILDERS[kind]
    case = Case(idx, kind, group)
    builder(ctx, case, random.Random(f"{seed}:{idx}:{kind}"))
    return case
