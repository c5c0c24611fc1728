# Sourced by scripts/buf_check.sh and scripts/contract_baseline.sh (from the repository root), so that the
# released contract's baseline and the image `make lint` checks against it are built the same way.
# proto_image SRC_DIR OUT [protoc flags...]: a FileDescriptorSet of every fabrica/**/*.proto under SRC_DIR,
# with all its imports (--include_imports), built by protoc from grpc_tools, with buf.validate, google/api,
# google/rpc and the well-known types taken from the installed packages (scripts/validate_descriptor.py).
# Nothing is fetched.
proto_image() {
  local src="$1" out="$2" files deps
  shift 2
  files=$(cd "$src" && find fabrica -name '*.proto' | LC_ALL=C sort)
  if [ -z "$files" ]; then
    echo "no fabrica/**/*.proto under $src" >&2
    return 1
  fi
  deps=$(mktemp)
  .venv/bin/python scripts/validate_descriptor.py "$deps"
  .venv/bin/python -m grpc_tools.protoc -I "$src" --descriptor_set_in="$deps" \
    --include_imports --descriptor_set_out="$out" "$@" $files
  rm -f "$deps"
}
