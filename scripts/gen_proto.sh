#!/usr/bin/env bash
# Regenerates the committed Python stubs (with .pyi types) from proto/.
# CI runs this and fails when the tree changes (`make proto-check`).
# Generation happens in a temporary directory first, so a failing protoc
# never leaves the tree without stubs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_BIN="$(pwd)/.venv/bin"
export PATH="$VENV_BIN:$PATH"
PY=${PY:-$VENV_BIN/python}
# protoc runs from proto/, so a relative interpreter path is made absolute.
case "$PY" in /*) ;; */*) PY="$(pwd)/$PY" ;; esac
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mapfile -t files < <(cd proto && find triplane -name '*.proto' | sort)
(cd proto && "$PY" -m grpc_tools.protoc -I . \
  --python_out="$out" --mypy_out="$out" --grpc_python_out="$out" --mypy_grpc_out="$out" \
  "${files[@]}") >/dev/null
find triplane -path '*/v1/*' \( -name '*_pb2*.py' -o -name '*_pb2*.pyi' \) -delete
(cd "$out" && find triplane -type f) | while read -r f; do
  mkdir -p "$(dirname "$f")"
  cp "$out/$f" "$f"
done
# Every generated directory is a regular package, so mypy and setuptools see it.
for dir in $(cd proto && find triplane -name '*.proto' -exec dirname {} \; | sort -u); do
  d="$dir"
  while [ "$d" != "." ] && [ "$d" != "" ]; do
    [ -f "$d/__init__.py" ] || : > "$d/__init__.py"
    d=$(dirname "$d")
  done
done
