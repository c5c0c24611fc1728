#!/usr/bin/env bash
# Generate Python modules, gRPC stubs and .pyi type stubs from protos/ into the folder given (default gen/), and
# fabrica/descriptor_set.binpb: the Fabrica protos' descriptors with their comments (for server reflection).
# buf/validate/validate.proto is compiled from the descriptor embedded in the installed protovalidate
# package (see scripts/validate_descriptor.py), so generated code and runtime validator always agree.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gen}"
py=.venv/bin/python
mkdir -p build
"$py" scripts/validate_descriptor.py build/validate.binpb
protos=$(cd protos && find fabrica -name '*.proto' | LC_ALL=C sort)
rm -rf "$out/fabrica" "$out/buf"
mkdir -p "$out"
PATH="$PWD/.venv/bin:$PATH" "$py" -m grpc_tools.protoc \
  -I protos --descriptor_set_in=build/validate.binpb \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out=quiet:"$out" --mypy_grpc_out=quiet:"$out" \
  $protos buf/validate/validate.proto
# The same files with their comments, for server reflection (grpcurl describe; runtime/reflection.py): the
# generated modules carry no source info.
"$py" -m grpc_tools.protoc -I protos --descriptor_set_in=build/validate.binpb --include_source_info \
  --descriptor_set_out="$out/fabrica/descriptor_set.binpb" $protos
# protoc writes no __init__.py; regular packages keep imports and packaging simple.
find "$out/fabrica" "$out/buf" -type d -exec sh -c 'for d; do : > "$d/__init__.py"; done' sh {} +
# Service-less files get empty *_grpc modules; drop them so gen/ holds only what is used.
for f in $(grep -L "class .*Stub" $(find "$out" -name '*_pb2_grpc.py')); do rm -f "$f" "${f%.py}.pyi"; done
