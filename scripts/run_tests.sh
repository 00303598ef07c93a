#!/usr/bin/env bash
# The test command: each test package in its own pytest process, then one summary. Extra
# arguments go to pytest. The upcycling tests import transformers (which loads scipy's and
# tokenizers' native libraries); in a process that then runs the Triton interpreter, calls
# into torch's custom-op dispatcher were seen to fail (std::length_error, segfaults), so
# those tests get a process of their own.
set -uo pipefail
cd "$(dirname "$0")/.."
failed=()
run() {
  echo "== pytest $*"
  python -m pytest -q "$@" || failed+=("$1")
}
run tests/kernels "$@"
run tests/models --ignore=tests/models/test_upcycle.py "$@"
run tests/models/test_upcycle.py "$@"
run tests/coding "$@"
run tests/scaling "$@"
run tests/test_bench_harness.py "$@"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED groups: ${failed[*]}"
  exit 1
fi
echo "all test groups passed"
