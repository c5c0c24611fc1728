"""Write a FileDescriptorSet holding the imports that protoc cannot find in protos/.

- buf/validate/validate.proto: protovalidate ships no validate.proto; its generated module embeds the
  serialized file descriptor. We take it from the installed package (the pinned version in requirements.txt)
  so that protoc and buf compile our protos against exactly the rules the runtime validator enforces.
- google/rpc/status.proto and google/rpc/error_details.proto (ErrorInfo, BadRequest, ...), google/api's
  annotations (field_behavior, resource, http): from the installed googleapis-common-protos, so that clients
  generated from gen/fabrica/image.binpb can decode the error details the services send.
- the well-known types they import, from the installed protobuf runtime.

Nothing is fetched.

Usage: python scripts/validate_descriptor.py OUT.binpb
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from google.api import annotations_pb2, field_behavior_pb2, http_pb2, resource_pb2
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    duration_pb2,
    field_mask_pb2,
    timestamp_pb2,
)
from google.rpc import error_details_pb2, status_pb2


def validate_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    import protovalidate._gen.buf.validate.validate_pb as generated

    tree = ast.parse(Path(generated.__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "file_desc"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, bytes)
        ):
            fdp = descriptor_pb2.FileDescriptorProto.FromString(node.args[0].value)
            if fdp.name == "buf/validate/validate.proto":
                return fdp
    raise SystemExit(f"no embedded buf/validate/validate.proto descriptor found in {generated.__file__}")


# In dependency order: each file's imports come before it.
_MODULES = (
    descriptor_pb2,
    any_pb2,
    duration_pb2,
    field_mask_pb2,
    timestamp_pb2,
    http_pb2,
    annotations_pb2,
    field_behavior_pb2,
    resource_pb2,
    status_pb2,
    error_details_pb2,
)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    out = descriptor_pb2.FileDescriptorSet()
    for module in _MODULES:
        module.DESCRIPTOR.CopyToProto(out.file.add())
    out.file.append(validate_file_descriptor())
    path = Path(argv[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.SerializeToString())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
