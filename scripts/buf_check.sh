#!/usr/bin/env bash
# buf lint, and buf breaking against the protos on the `main` branch (or $BUF_AGAINST_REF), offline.
# Both run on images that protoc builds, with buf.validate taken from the installed protovalidate.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
buf=.venv/bin/buf
mkdir -p build
"$py" scripts/validate_descriptor.py build/validate.binpb
image() { # image SRC_DIR OUT
  local files
  files=$(cd "$1" && find fabrica -name '*.proto' | LC_ALL=C sort)
  "$py" -m grpc_tools.protoc -I "$1" --descriptor_set_in=build/validate.binpb \
    --include_imports --include_source_info --descriptor_set_out="$2" $files
}
image protos build/fabrica.binpb
"$buf" lint build/fabrica.binpb --config buf.yaml --path fabrica
echo "buf lint: clean"
ref="${BUF_AGAINST_REF:-main}"
if git rev-parse --verify --quiet "$ref:protos" >/dev/null; then
  against=$(mktemp -d)
  trap 'rm -rf "$against"' EXIT
  git archive "$ref" protos | tar -x -C "$against"
  image "$against/protos" build/against.binpb
  "$buf" breaking build/fabrica.binpb --against build/against.binpb --config buf.yaml --path fabrica
  echo "buf breaking against $ref: compatible"
else
  echo "buf breaking: no protos on $ref yet, nothing to compare"
fi
