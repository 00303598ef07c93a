#!/usr/bin/env bash
# The test command: each test package in its own pytest process, then one summary. Extra
# arguments go to pytest. The upcycling, layer-by-layer and transformers-experts tests import transformers (which loads scipy's and
# tokenizers' native libraries); in a process that then runs the Triton interpreter, calls
# into torch's custom-op dispatcher were seen to fail (std::length_error, segfaults), so
# those tests get a process of their own.
#
# The packages run in two lanes at once: the kernel tests (most of the time, spent in the
# single-threaded Triton interpreter) and everything else one after another. Each lane's
# output goes to a log that is printed when the lane ends. FLOPWISE_TEST_LANES=1 runs the
# packages one after another instead.
set -uo pipefail
cd "$(dirname "$0")/.."
logs="$(mktemp -d)"
kernels_pid=""
# stopped or interrupted: stop the kernel lane too, and show what it had printed
trap 'if [ -n "$kernels_pid" ]; then pkill -TERM -P "$kernels_pid" 2>/dev/null; kill "$kernels_pid" 2>/dev/null; cat "$logs/kernels.log" 2>/dev/null; fi; rm -rf "$logs"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

run() {  # run NAME PYTEST-ARGS...: one pytest process; NAME is recorded if it fails
  local name="$1" rc=0
  shift
  echo "== pytest $*"
  python -m pytest -q "$@" || rc=$?
  # pytest's 5 is "no tests collected": with a filter (-k, -m, a node id) from the caller,
  # a package it selects nothing in is not a failure; without one it is (a package lost its tests)
  if [ $rc -eq 5 ] && [ $filtered -eq 1 ]; then echo "$name" >>"$logs/empty"
  elif [ $rc -ne 0 ]; then echo "$name" >>"$logs/failed"; fi
  echo "$name" >>"$logs/ran"
}

# Two kernel test files run in the other lane, which is shorter: the lanes then take about
# the same time (the kernel lane was ~350 s the longer of the two on 2 cores).
MOVED=(tests/kernels/test_autotune.py tests/kernels/test_weight_layouts.py)

lane_kernels() {  # (a pytest cache of its own: two processes writing one would lose results)
  run tests/kernels tests/kernels "${MOVED[@]/#/--ignore=}" -o cache_dir=.pytest_cache/kernels "$@"
}

lane_rest() {
  run "tests/kernels (autotune, weight layouts)" "${MOVED[@]}" "$@"
  run tests/models tests/models --ignore=tests/models/test_upcycle.py --ignore=tests/models/test_hf_experts.py \
    --ignore=tests/models/test_layerwise.py "$@"
  run "tests/models (transformers)" tests/models/test_upcycle.py tests/models/test_hf_experts.py \
    tests/models/test_layerwise.py "$@"
  run tests/coding tests/coding "$@"
  run tests/scaling tests/scaling "$@"
  run tests/test_bench_harness.py tests/test_bench_harness.py "$@"
  run tests/test_readme.py tests/test_readme.py "$@"
}

filtered=0; [ $# -gt 0 ] && filtered=1
start=$SECONDS
if [ "${FLOPWISE_TEST_LANES:-2}" = "1" ]; then
  lane_kernels "$@"
  lane_rest "$@"
else
  # one torch thread per process: two lanes on two cores
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  lane_kernels "$@" >"$logs/kernels.log" 2>&1 &
  kernels_pid=$!
  lane_rest "$@" >"$logs/rest.log" 2>&1
  echo "== lane: models, upcycling, coding, scaling, bench harness, two kernel files ($((SECONDS - start)) s)"
  cat "$logs/rest.log"
  wait "$kernels_pid" || echo "tests/kernels (lane exited with $?)" >>"$logs/failed"
  kernels_pid=""
  echo "== lane: kernels ($((SECONDS - start)) s)"
  cat "$logs/kernels.log"
fi

if [ -s "$logs/empty" ] && [ "$(wc -l <"$logs/empty")" = "$(wc -l <"$logs/ran")" ]; then
  echo "no test selected in any group: $*" >>"$logs/failed"
fi
if [ -s "$logs/failed" ]; then
  echo "FAILED groups: $(tr '\n' ' ' <"$logs/failed")"
  exit 1
fi
echo "all test groups passed ($((SECONDS - start)) s)"
