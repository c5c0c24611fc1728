"""The test receiver behaves as a real HTTP server where the kill tests depend on it: a request whose sender
dies mid-body is not a request (a webhook cut by a SIGKILL must not count as a delivery with an empty body)."""

from __future__ import annotations

import socket
import time
import urllib.request

from webhook_receiver import Receiver


def _post_cut_short(url_host: str, port: int) -> None:
    with socket.create_connection((url_host, port)) as s:
        s.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nIdempotency-Key: k\r\n\r\n{\"partial\":")


def test_a_request_cut_mid_body_is_not_recorded_and_a_whole_one_is() -> None:
    with Receiver() as receiver:
        host, port = receiver.server.server_address[:2]
        _post_cut_short(host, port)
        request = urllib.request.Request(receiver.url("/hook"), data=b'{"whole":true}', method="POST",
                                         headers={"Idempotency-Key": "k"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
        time.sleep(0.3)  # the cut request's handler has long seen its EOF (it would have recorded by now)
        assert [r.body for r in receiver.at("/hook")] == [b'{"whole":true}']
