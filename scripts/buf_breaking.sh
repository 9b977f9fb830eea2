#!/usr/bin/env bash
# `buf breaking` (FILE rules, from the workspace's buf.yaml at the repository
# root) against the previous commit, or against BUF_AGAINST (e.g.
# '.git#branch=origin/main').
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=${BUF:-.venv/bin/buf}
against=${BUF_AGAINST:-}
if [ -z "$against" ]; then
  if ! git rev-parse --verify -q HEAD~1 >/dev/null; then
    echo "buf breaking: no previous commit to compare with; skipped"
    exit 0
  fi
  if [ -z "$(git ls-tree -d HEAD~1 proto 2>/dev/null)" ]; then
    echo "buf breaking: previous commit has no proto/; skipped"
    exit 0
  fi
  if git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then
    against='.git#ref=HEAD~1'
  else
    # Before the workspace moved to the root, the module was proto/ itself.
    against='.git#ref=HEAD~1,subdir=proto'
  fi
fi
"$BUF" breaking --against "$against"
echo "buf breaking: no breaking changes against $against"
