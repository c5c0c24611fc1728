"""protovalidate, turned into the domain's field violations. No gRPC here: domain code uses it too."""

from __future__ import annotations

import protovalidate
from google.protobuf import message

from .errors import FieldViolation


def field_path(violation: protovalidate.Violation) -> str:
    """``plc.tags[2].name`` from a protovalidate violation."""
    parts: list[str] = []
    for element in violation.proto.field.elements:
        part = element.field_name
        subscript = element.subscript  # a protobuf-py oneof: .field names the member, .value holds it
        if subscript is not None:
            if subscript.field == "index":
                part += f"[{subscript.value}]"
            else:
                part += f"[{subscript.value!r}]"
        parts.append(part)
    return ".".join(parts)


def violations_of(msg: message.Message, prefix: str = "") -> list[FieldViolation]:
    """Every protovalidate violation of `msg`, with paths under `prefix` (e.g. ``plc``)."""
    out = []
    for v in protovalidate.collect_violations(msg):
        path = field_path(v)
        path = ".".join(p for p in (prefix, path) if p) or "(message)"
        out.append(FieldViolation(path, v.proto.message or v.proto.rule_id))
    return out
