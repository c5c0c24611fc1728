"""Helpers for asserting on gRPC errors: the rich google.rpc.Status and its details."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from fabrica_svc.runtime.interceptors import STATUS_DETAILS_KEY


def rich_status(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in err.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no {STATUS_DETAILS_KEY} in {err.trailing_metadata()}")


def field_violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rich_status(err)
    out: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            out.update({v.field: v.description for v in br.field_violations})
    return out


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for detail in rich_status(err).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the status details")
