"""A real HTTP webhook receiver for the notification tests: ``http.server`` on 127.0.0.1, a random port,
in a thread. It records every POST (its JSON body and whether it was accepted) and answers 503 while
``refusing`` is set, so a test can hold notifications in the daemon's outbox."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Receiver:
    url: str
    refusing: bool = False
    posts: list[tuple[dict[str, Any], bool]] = field(default_factory=list)  # (body, accepted)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted(self) -> list[dict[str, Any]]:
        with self.lock:
            return [body for body, ok in self.posts if ok]

    def refused(self) -> list[dict[str, Any]]:
        with self.lock:
            return [body for body, ok in self.posts if not ok]


@contextmanager
def receiver() -> Iterator[Receiver]:
    rec = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body["_idempotency_key"] = self.headers.get("Idempotency-Key")
            with rec.lock:
                ok = not rec.refusing
                rec.posts.append((body, ok))
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()
