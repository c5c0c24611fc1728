"""The consumer logs a failed WatchTagEvents with its decoded error details (google.rpc.Status), through the
clients' one decoder (clients/errors.py)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from fabrica_svc.clients.errors import error_details


def _error(code: grpc.StatusCode, message: str, *details: object) -> grpc.aio.AioRpcError:
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)  # type: ignore[arg-type]
        packed.append(a)
    status = rpc_status.to_status(status_pb2.Status(code=getattr(code_pb2, code.name), message=message,
                                                    details=packed))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata), message)


def test_details_are_decoded() -> None:
    info = error_details_pb2.ErrorInfo(reason="CURSOR_TOO_OLD", domain="fabrica.ingest")
    details = error_details(_error(grpc.StatusCode.FAILED_PRECONDITION, "cursor gone", info))
    text = str(details)  # what the consumer logs
    assert text.startswith("FAILED_PRECONDITION: cursor gone [")
    assert "reason CURSOR_TOO_OLD" in text and details.domain == "fabrica.ingest"


def test_an_error_without_details_is_code_and_message() -> None:
    err = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "connect failed")
    assert str(error_details(err)) == "UNAVAILABLE: connect failed"
