#!/usr/bin/env bash
# buf lint of the protos, then buf breaking of them against the released contract, offline (`make lint`).
# - Always against protos/baseline/fabrica.binpb, the committed image of the last release
#   (`make contract-baseline` refreshes it after a release; README "Keeping the contract compatible").
#   A missing baseline is an error: without it nothing would be compared.
# - Also against the protos of the git ref $BUF_AGAINST_REF, when that is set (e.g. BUF_AGAINST_REF=main
#   on a feature branch); a ref that does not exist or holds no protos/ is an error, not a skip.
# FABRICA_PROTOS_DIR: the protos to check (default protos/ of this repository), e.g. a changed copy
# (tests/deploy/test_contract_breaking.py); FABRICA_CONTRACT_BASELINE: the baseline image (default
# protos/baseline/fabrica.binpb). Every image is built by protoc (scripts/proto_image.sh), with
# buf.validate taken from the installed protovalidate; images are built in a temporary directory.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
protos=$(cd "${FABRICA_PROTOS_DIR:-$root/protos}" && pwd) || {
  echo "buf_check: FABRICA_PROTOS_DIR=${FABRICA_PROTOS_DIR:-} is not a directory" >&2
  exit 1
}
baseline="${FABRICA_CONTRACT_BASELINE:-$root/protos/baseline/fabrica.binpb}"
case "$baseline" in /*) ;; *) baseline="$PWD/$baseline" ;; esac
cd "$root"
. scripts/proto_image.sh
buf=.venv/bin/buf
ref="${BUF_AGAINST_REF:-}"
if [ -n "$ref" ]; then # checked first: a typo fails at once
  if ! git rev-parse --verify --quiet "$ref^{commit}" >/dev/null; then
    echo "buf breaking: BUF_AGAINST_REF=$ref is not a commit here (fetch it, or unset BUF_AGAINST_REF)" >&2
    exit 1
  fi
  if ! git rev-parse --verify --quiet "$ref:protos" >/dev/null; then
    echo "buf breaking: BUF_AGAINST_REF=$ref has no protos/ to compare against" >&2
    exit 1
  fi
fi
if [ ! -f "$baseline" ]; then
  echo "buf breaking: $baseline, the released contract to compare against, is missing;" \
    "restore it from git, or after a release write it with 'make contract-baseline'" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The current image keeps its source info, so that buf names the file and line of each finding.
proto_image "$protos" "$work/current.binpb" --include_source_info
if ! "$buf" lint "$work/current.binpb" --config buf.yaml --path fabrica; then
  echo "buf lint: $protos breaks the lint rules of buf.yaml (above)" >&2
  exit 1
fi
echo "buf lint: clean ($protos)"

breaking() { # breaking AGAINST_IMAGE WHAT
  if ! "$buf" breaking "$work/current.binpb" --against "$1" --config buf.yaml --path fabrica; then
    echo "buf breaking: $protos is NOT compatible with $2 (above). Add fields, messages and RPCs;" \
      "deprecate what is obsolete; never rename, renumber, retype or delete in place." >&2
    exit 1
  fi
  echo "buf breaking against $2: compatible"
}

breaking "$baseline" "the released contract $baseline"

if [ -n "$ref" ]; then
  mkdir "$work/ref"
  git archive "$ref" protos | tar -x -C "$work/ref"
  proto_image "$work/ref/protos" "$work/ref.binpb"
  breaking "$work/ref.binpb" "the protos of $ref ($(git rev-parse --short "$ref^{commit}"))"
fi
