#!/usr/bin/env bash
# `buf breaking` (FILE rules, from proto/buf.yaml) against the previous commit,
# or against BUF_AGAINST (e.g. '.git#branch=origin/main,subdir=proto').
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=${BUF:-.venv/bin/buf}
against=${BUF_AGAINST:-}
if [ -z "$against" ]; then
  if ! git rev-parse --verify -q HEAD~1 >/dev/null; then
    echo "buf breaking: no previous commit to compare with; skipped"
    exit 0
  fi
  if ! git ls-tree -d HEAD~1 proto >/dev/null 2>&1 || [ -z "$(git ls-tree -d HEAD~1 proto)" ]; then
    echo "buf breaking: previous commit has no proto/; skipped"
    exit 0
  fi
  against='.git#ref=HEAD~1,subdir=proto'
fi
"$BUF" breaking proto --against "$against"
echo "buf breaking: no breaking changes against $against"
