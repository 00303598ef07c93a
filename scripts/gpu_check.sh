#!/usr/bin/env bash
# The one command a GPU session runs: install in place (no network needed), the GPU tests,
# then the benchmarks, ending with a compact table. Results go to ${OUT:-.}/gpu-check/.
# Usage: bash scripts/gpu_check.sh [bench ops ...]    (default: all suites)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/gpu-check"
mkdir -p "$out"

python -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || {
  echo "install failed"; cat "$out/install.log"; exit 1; }
python - <<'PY' | tee "$out/env.txt"
import torch, triton
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
print("torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda)
PY

echo "== GPU tests (pytest -m gpu)"
timeout 240 python -m pytest -m gpu -q -x -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.log" | tail -15
tests_rc=${PIPESTATUS[0]}

echo "== benchmarks"
timeout 300 python -m flopwise bench "$@" --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
bench_rc=${PIPESTATUS[0]}

echo "== summary: gpu tests rc=$tests_rc, bench rc=$bench_rc (tables above; JSON in $out/bench.json)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
