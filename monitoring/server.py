"""``trainbox serve``: the status server as its own process, on uvicorn's ``Config``/``Server``.

``serve`` binds the socket itself, so with port 0 it knows the real port, and prints one line,
``trainbox status server: http://HOST:PORT/``, once the server accepts connections: tests and
``trainbox up`` read the URL from it. SIGINT/SIGTERM are uvicorn's: it stops accepting, the open
event streams notice ``should_exit`` within half a second and end, then the lifespan closes the DB.

Also runnable as ``python -m monitoring.server --home H [--host A] [--port P]``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import socket
import sys
from collections.abc import Sequence

import uvicorn

from monitoring.app import create_app
from trainbox.config import ConfigError, Settings, load_settings
from trainbox.home import Home

URL_PREFIX = "trainbox status server: "
GRACEFUL_SHUTDOWN_S = 5


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto given explicitly: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and
    # without it every response waits ~40 ms on Nagle + delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def is_loopback(sock: socket.socket) -> bool:
    """Whether only this machine can reach the bound address (judged on the address actually bound,
    so a host name that resolves to a public address counts as public)."""
    host = sock.getsockname()[0]
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def exposure_warning(sock: socket.socket, settings: Settings) -> str | None:
    """The warning for a server others can reach whose reads need no token, else None.

    Control and upload always need the token; what is open is everything a read shows (job and
    file names, losses, events, host metrics), so say so and name the setting that closes it."""
    if is_loopback(sock) or settings.server.read_requires_token:
        return None
    host = sock.getsockname()[0]
    return (
        f"trainbox serve: WARNING: listening on {host}, which other machines can reach, and reads need no "
        "token: anyone who can connect sees the status, queue, jobs, metrics and events. Set "
        "server.read_requires_token = true in trainbox.toml to require the API token for reads too "
        "(control and upload always require it)."
    )


def serve(home: Home, settings: Settings, log_level: str = "warning", max_upload_bytes: int | None = None) -> None:
    """Run the server for ``home`` in the foreground until SIGINT/SIGTERM.

    The exposure warning goes to stderr before the URL line, so it lands wherever the server's
    output goes (the terminal, ``logs/server.log`` under ``trainbox up``, the journal under systemd)."""
    sock = bind(settings.server.host, settings.server.port)
    warning = exposure_warning(sock, settings)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    server: uvicorn.Server | None = None

    def stopping() -> bool:
        return server is not None and server.should_exit

    app = create_app(home, settings, stopping=stopping, max_upload_bytes=max_upload_bytes)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    asyncio.run(_run(server, sock))


async def _run(server: uvicorn.Server, sock: socket.socket) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        print(f"{URL_PREFIX}{url_of(sock)}", flush=True)
    await task


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.server", description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=None, help="the trainbox home (default: $TRAINBOX_HOME or the cwd)")
    parser.add_argument("--host", default=None, help="override server.host")
    parser.add_argument("--port", type=int, default=None, help="override server.port (0: any free port)")
    parser.add_argument("--max-upload-bytes", type=int, default=None, help="override the upload size limit")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    home = Home.resolve(args.home)
    try:
        settings = load_settings(home.config_file)
        if args.host is not None:
            settings.server.host = args.host
        if args.port is not None:
            settings.server.port = args.port
    except (ConfigError, ValueError) as e:
        print(f"trainbox serve: {e}", file=sys.stderr)
        return 2
    try:
        serve(home, settings, args.log_level, args.max_upload_bytes)
    except OSError as e:
        print(f"trainbox serve: cannot listen on {settings.server.host}:{settings.server.port}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
