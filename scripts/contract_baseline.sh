#!/usr/bin/env bash
# Write protos/baseline/fabrica.binpb: the released contract, which `make lint` (scripts/buf_check.sh) holds
# protos/ to with `buf breaking`. Run it (`make contract-baseline`) after a release, on the released commit,
# and commit the file. It is a descriptor image (FileDescriptorSet) of protos/fabrica with all its imports and
# without source info (comments and line numbers are not part of compatibility, and keep it small).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/proto_image.sh
out=protos/baseline/fabrica.binpb
mkdir -p "$(dirname "$out")"
proto_image protos "$out.tmp"
mv "$out.tmp" "$out"
echo "$out: $(wc -c <"$out") bytes, the contract of $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- protos/fabrica || echo ' plus uncommitted changes to protos/fabrica')"
