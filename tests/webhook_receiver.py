"""A real HTTP receiver on loopback that stands in for the outside system in webhook and forwarding tests.

A ThreadingHTTPServer in a thread of its own (so it answers whatever the event loop under test is doing).
It records every request it gets (path, headers, body) and answers by path: a script of status codes to
answer first (then 200), or "hang" (hold the request open until released: a dead target that accepts the
connection and never answers).

Like a real HTTP server, it records only whole requests: one whose body stops short of its Content-Length (the
sender died mid-request, as the kill tests make it) was never received, is not recorded and gets no answer. A
connection reset by its sender (killed while the connection was kept alive, or mid-request) ends quietly, with
no traceback from socketserver.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        #: path -> status codes to answer, in order, before answering 200.
        self.script: dict[str, list[int]] = {}
        #: Paths whose requests are held open until `release`.
        self.hanging: set[str] = set()
        #: Requests held open right now, by path.
        self.held: dict[str, int] = {}
        self._released = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle(self) -> None:
                try:
                    super().handle()
                except ConnectionResetError:  # the sender died on a kept-alive connection: nothing was sent
                    self.close_connection = True

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                if len(body) < length:  # the connection closed mid-body: no request, nothing to answer
                    self.close_connection = True
                    return
                path = self.path
                with receiver._lock:
                    receiver.requests.append(Received(path, {k: v for k, v in self.headers.items()}, body))
                    hang = path in receiver.hanging
                    status = receiver.script[path].pop(0) if receiver.script.get(path) else 200
                    if hang:
                        receiver.held[path] = receiver.held.get(path, 0) + 1
                if hang:
                    receiver._released.wait(60)
                    with receiver._lock:
                        receiver.held[path] -= 1
                payload = b"ok" if status < 300 else b"receiver says no"
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the sender died waiting for the answer
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}{path}"

    def at(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def release(self) -> None:
        self._released.set()

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
