#!/usr/bin/env bash
# Regenerates the committed Python stubs (with .pyi types) from proto/.
# CI runs this and fails when the tree changes (`make proto-check`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
find triplane -path '*/v1/*' \( -name '*_pb2*.py' -o -name '*_pb2*.pyi' \) -delete
mapfile -t files < <(cd proto && find triplane -name '*.proto' | sort)
(cd proto && "../$PY" -m grpc_tools.protoc -I . \
  --python_out=.. --mypy_out=.. --grpc_python_out=.. --mypy_grpc_out=.. "${files[@]}")
# Every generated directory is a regular package, so mypy and setuptools see it.
for dir in $(cd proto && find triplane -name '*.proto' -exec dirname {} \; | sort -u); do
  d="$dir"
  while [ "$d" != "." ] && [ "$d" != "" ]; do
    [ -f "$d/__init__.py" ] || : > "$d/__init__.py"
    d=$(dirname "$d")
  done
done
