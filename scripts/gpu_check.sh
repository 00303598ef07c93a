#!/usr/bin/env bash
# The one command a GPU session runs: install in place (no network needed), the GPU tests,
# then the benchmark suites, each in its own process under its own time limit, printing each
# case's rows as they are measured and a table per suite. Results go to ${OUT:-.}/gpu-check/.
#
# Usage: bash scripts/gpu_check.sh [--no-tests] [suite ...]      (default: tests + all suites)
#
# Time limits (seconds; a suite stopped by its limit keeps the rows it measured):
#   GPU tests 180 | routing 90 | mod 90 | moe 260 | mod_step 120 | train 210 | coding 60
# (routing, mod and mod_step also time every provider as CUDA-graph replays: device time)
# (train also prints, per model, a profile of its compiled step by kernel category)
# (moe's first call per shape autotunes the grouped matmuls, about 50 extra kernel builds
#  in the suite, up to 33 more for the persistent row-kernel candidates and about 25 for the
#  deterministic-mode row (triton-deterministic, the last of each fwd+bwd case), about 20 for the
#  transformers-layout rows at the OLMoE-like shape (triton-hf: weights read transposed), and prints the
#  picks after each shape; every row is checked against its reference in that same first
#  call, so the picks' results are checked too. The GPU tests run with FLOPWISE_AUTOTUNE=0,
#  except the autotuner's own test, which turns it on.)
# (every benchmark row is itself checked against its reference before it is timed)
# One device call may run 600 s, but 15 minutes of device time in all include the machine's
# start (a minute or more) and the transfers, so plan two calls of about 360 s each:
#   bash scripts/gpu_check.sh --no-tests moe mod                           # <= 350 s
#   LIMIT_train=120 bash scripts/gpu_check.sh routing train                 # GPU tests + both, <= 390 s
# and, in another session: diagnose, mod_step, coding (LIMIT_<suite> shortens any suite).
# Pseudo-suite "diagnose" (limit 120 s): python scripts/tune_grouped_mm.py --stages (each MoE
# layer launch on its own), python scripts/profile_mod.py --only ops (kernel vs host time) and
# --only memory (what is live at the MoD step's peak, by allocating line, ours and plain torch).
# Pseudo-suite "experiment" (limit 420 s): flopwise coding experiment --preset gpu-fit (#8's
# experiment at GPU scale); its results.json is rewritten after each M2 run, so a time limit
# keeps what finished, and is copied to the output folder. The device has no network, so the
# corpus travels with the call: here `flopwise data fetch`, then
# `mkdir -p .data && cp -r "${FLOPWISE_DATA:-$HOME/.cache/flopwise}/corpus" .data/` (git-ignored),
# and run with carry [".data"] and FLOPWISE_DATA=.data in front of the command; with
# --no-tests, so that one 600 s call holds it: FLOPWISE_DATA=.data bash scripts/gpu_check.sh --no-tests experiment
# Environment: LIMIT_<suite>=seconds overrides a suite's limit; BUDGET_MS sets the timing
# budget per provider (flopwise bench --budget-ms); ALLOW_CPU=1 runs it without a CUDA device
# (the kernels interpreted: slow, for checking the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${ALLOW_CPU:-0}" != 1 ] && ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "scripts/gpu_check.sh needs a CUDA device (torch.cuda.is_available() is False here); nothing was" \
       "installed or written. ALLOW_CPU=1 runs it anyway, with the kernels interpreted (slow)." >&2
  exit 2
fi
out="${OUT:-.}/gpu-check"
mkdir -p "$out"

export PYTHONUNBUFFERED=1  # a suite killed by its limit must not lose buffered rows
# One kernel cache for the whole check (the processes run one after another): a suite reuses
# the kernels the tests and earlier suites built instead of compiling them again. Outside $out,
# so the compiled files do not travel back with the results.
cache="${TMPDIR:-/tmp}/flopwise-gpu-check-cache"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$cache/triton}" TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$cache/inductor}"
run_tests=1
if [ "${1:-}" = "--no-tests" ]; then run_tests=0; shift; fi  # first argument only
suites=("$@")
[ ${#suites[@]} -eq 0 ] && suites=(routing mod moe mod_step train coding)
declare -A limit=([routing]=90 [mod]=90 [moe]=260 [mod_step]=120 [train]=210 [coding]=60 [diagnose]=120 [experiment]=420)
for s in "${!limit[@]}"; do  # LIMIT_<suite>=seconds overrides a limit (a shorter device slot)
  v="LIMIT_$s"; [ -n "${!v:-}" ] && limit[$s]=${!v}
done
budget=(); [ -n "${BUDGET_MS:-}" ] && budget=(--budget-ms "$BUDGET_MS")  # timing budget per provider

python -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || {
  echo "install failed"; cat "$out/install.log"; exit 1; }
python - <<'PY' | tee "$out/env.txt"
import torch, triton
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
print("torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda)
PY

status=()
if [ $run_tests -eq 1 ]; then
  echo "== GPU tests (pytest -m gpu)"
  # the upcycling and layer-by-layer tests have no GPU test and import transformers: not collected here
  # (tests/models/test_hf_experts.py has GPU tests: collected when transformers >= 5 is installed)
  # SIGINT at the limit: pytest still prints which tests failed and the slowest ones
  FLOPWISE_AUTOTUNE=0 timeout -s INT -k 20 180 python -m pytest -m gpu -q -rfE --durations=8 -p no:cacheprovider \
    --ignore=tests/models/test_upcycle.py --ignore=tests/models/test_layerwise.py 2>&1 \
    | tee "$out/pytest-gpu.log" | tail -40
  status+=("tests rc=${PIPESTATUS[0]}")
fi

for s in "${suites[@]}"; do
  if [ "$s" = diagnose ]; then
    echo "== diagnose (limit ${limit[$s]} s)"
    timeout "${limit[$s]}" bash -c "python scripts/tune_grouped_mm.py --stages && python scripts/profile_mod.py --only ops \
      && python scripts/profile_mod.py --only memory" \
      2>&1 | tee "$out/diagnose.txt" | grep -v "^ "
    status+=("diagnose rc=${PIPESTATUS[0]}")
    continue
  fi
  if [ "$s" = experiment ]; then
    echo "== coding experiment, preset gpu-fit (limit ${limit[$s]} s)"
    corpus="${FLOPWISE_DATA:-$HOME/.cache/flopwise}/corpus"
    if [ ! -f "$corpus/train.txt" ]; then  # never the small embedded text in its place
      echo "no corpus at $corpus: carry it in (see this script's header)"; status+=("experiment rc=2"); continue
    fi
    exp_dir="$(mktemp -d)"  # token arrays and M1 stay on the device; results.json comes back
    timeout "${limit[$s]}" python -m flopwise coding experiment --preset gpu-fit --corpus "$corpus" --out "$exp_dir" --quiet 2>&1 \
      | tee "$out/experiment.txt"
    status+=("experiment rc=${PIPESTATUS[0]}")
    cp "$exp_dir/results.json" "$out/experiment-results.json" 2>/dev/null
    continue
  fi
  echo "== bench $s (limit ${limit[$s]:-120} s)"
  timeout "${limit[$s]:-120}" python -m flopwise bench "$s" "${budget[@]}" --progress --json "$out/bench-$s.json" 2>&1 \
    | tee "$out/bench-$s.txt"
  status+=("$s rc=${PIPESTATUS[0]}")
done

echo "== summary: ${status[*]} (rc 124: stopped by its time limit; JSON per suite in $out/)"
for st in "${status[@]}"; do [ "${st##*rc=}" -eq 0 ] || exit 1; done
