"""The built web UI (web/dist, `npm run build` in web/), served by the gateway on the same origin as the
RPCs, so the browser needs no CORS for it.

``/`` and any path without a file extension (the UI's own routes, e.g. ``/orders``) get ``index.html``;
hashed assets under ``/assets/`` are cached for a year, everything else is revalidated. Nothing outside the
folder is ever served.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".html": "text/html",
          ".svg": "image/svg+xml", ".json": "application/json", ".webmanifest": "application/manifest+json",
          ".wasm": "application/wasm", ".map": "application/json"}


async def _respond(send: Any, status: int, body: bytes, content_type: str, extra: list[tuple[bytes, bytes]],
                   head: bool) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
               (b"x-content-type-options", b"nosniff"), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


class StaticFiles:
    def __init__(self, root: Path | None) -> None:
        self.root = root.resolve() if root is not None else None

    def _file(self, path: str) -> Path | None:
        assert self.root is not None
        relative = path.lstrip("/")
        candidate = (self.root / relative).resolve() if relative else self.root / "index.html"
        if not candidate.is_relative_to(self.root):
            return None
        if candidate.is_file():
            return candidate
        if "." not in Path(relative).name:  # a route of the UI, not a file
            index = self.root / "index.html"
            return index if index.is_file() else None
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b"only GET and HEAD here\n", "text/plain; charset=utf-8",
                           [(b"allow", b"GET, HEAD")], False)
            return
        head = method == "HEAD"
        if self.root is None:
            await _respond(send, 404, b"The web UI is not built: run `npm run build` in web/.\n",
                           "text/plain; charset=utf-8", [], head)
            return
        file = self._file(scope["path"])
        if file is None:
            await _respond(send, 404, b"not found\n", "text/plain; charset=utf-8", [], head)
            return
        content_type = _TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith(("json", "javascript")):
            content_type += "; charset=utf-8"
        immutable = file.parent.name == "assets" and file.parent.parent == self.root
        cache = b"public, max-age=31536000, immutable" if immutable else b"no-cache"
        await _respond(send, 200, file.read_bytes(), content_type, [(b"cache-control", cache)], head)
