#!/usr/bin/env bash
# The test command: each test package in its own pytest process (the kernel tests run
# Triton's interpreter and native extensions; separate processes keep one package's
# process state from reaching another's), then one summary. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
failed=()
for group in tests/kernels tests/models tests/coding tests/scaling tests/test_bench_harness.py; do
  echo "== pytest $group"
  python -m pytest -q "$group" "$@" || failed+=("$group")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED groups: ${failed[*]}"
  exit 1
fi
echo "all test groups passed"
