#!/usr/bin/env bash
# Generate, from protos/:
# - into the folder given first (default gen/): Python modules, gRPC stubs and .pyi type stubs;
#   fabrica/descriptor_set.binpb, the Fabrica protos' descriptors with their comments (server reflection);
#   fabrica/image.binpb, the descriptor IMAGE of every Fabrica proto with all its imports (buf.validate,
#   google/protobuf) and comments, plus google/rpc/status.proto and error_details.proto (the error details
#   the services send): everything a client generator in any language needs, offline (README, buf.gen.yaml).
# - into the folder given second (default web/src/gen/): TypeScript from that image with protoc-gen-es
#   (web/package.json pins it; `make gen` runs npm ci first).
# buf/validate/validate.proto is compiled from the descriptor embedded in the installed protovalidate
# package (see scripts/validate_descriptor.py), so generated code and runtime validator always agree.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gen}"
ts_out="${2:-web/src/gen}"
py=.venv/bin/python
es=web/node_modules/.bin/protoc-gen-es
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
# The image: self-contained (--include_imports), so `buf generate gen/fabrica/image.binpb` or
# `protoc --descriptor_set_in=gen/fabrica/image.binpb` need nothing else.
extra="google/rpc/status.proto google/rpc/error_details.proto"
"$py" -m grpc_tools.protoc -I protos --descriptor_set_in=build/validate.binpb --include_imports \
  --include_source_info --descriptor_set_out="$out/fabrica/image.binpb" $protos $extra
# protoc writes no __init__.py; regular packages keep imports and packaging simple.
find "$out/fabrica" "$out/buf" -type d -exec sh -c 'for d; do : > "$d/__init__.py"; done' sh {} +
# Service-less files get empty *_grpc modules; drop them so gen/ holds only what is used.
for f in $(grep -L "class .*Stub" $(find "$out" -name '*_pb2_grpc.py')); do rm -f "$f" "${f%.py}.pyi"; done
# TypeScript, from the image alone (what any other team would do). Messages and service descriptors in one
# *_pb.ts per file; @connectrpc/connect v2 clients take the service descriptors directly.
if [ ! -x "$es" ]; then
  echo "$es is missing: run 'make gen' (it runs npm ci in web/ first)" >&2
  exit 1
fi
rm -rf "$ts_out"
mkdir -p "$ts_out"
"$py" -m grpc_tools.protoc --descriptor_set_in="$out/fabrica/image.binpb" \
  --plugin=protoc-gen-es="$es" --es_out="$ts_out" --es_opt=target=ts \
  $protos buf/validate/validate.proto $extra google/api/field_behavior.proto
