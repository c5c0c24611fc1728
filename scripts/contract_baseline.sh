#!/usr/bin/env bash
# Write protos/baseline/fabrica.binpb: the released contract, which `make lint` (scripts/buf_check.sh) holds
# protos/ to with `buf breaking`. Run it (`make contract-baseline`) after a release, on the released commit,
# and commit the file. It is a descriptor image (FileDescriptorSet) of protos/fabrica with all its imports and
# without source info (comments and line numbers are not part of compatibility, and keep it small).
# Usage: scripts/contract_baseline.sh [OUT]; OUT defaults to protos/baseline/fabrica.binpb, and
# FABRICA_PROTOS_DIR (default protos/) names the protos to take, as for scripts/buf_check.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
protos=$(cd "${FABRICA_PROTOS_DIR:-$root/protos}" && pwd)
out="${1:-$root/protos/baseline/fabrica.binpb}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
cd "$root"
. scripts/proto_image.sh
mkdir -p "$(dirname "$out")"
proto_image "$protos" "$out.tmp"
mv "$out.tmp" "$out"
if [ "$protos" = "$root/protos" ]; then
  from="protos/ of $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)')"
  git diff --quiet HEAD -- protos/fabrica 2>/dev/null || from="$from plus uncommitted changes to protos/fabrica"
else
  from="$protos"
fi
echo "$out: $(wc -c <"$out") bytes, the contract of $from"
