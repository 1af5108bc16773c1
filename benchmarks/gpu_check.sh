#!/usr/bin/env bash
# GPU check of the cuda runner (DESIGN.md §6): the gpu-marked kernel tests, then kernel and engine
# timings (benchmarks/gpu_check.py). Writes OUTDIR/{env.txt,tests.log,tests.xml,bench.log,gpu_check.json,
# gpu_check.png,summary.txt}.
# Finishes in under 5 minutes on an H100; needs torch and cuda-python (cuda.core), pytest if present.
# Where tensorrt, onnx and onnxscript import, a separate step (at most 90 s, its own log) builds the
# tiny model's TensorRT engines and compares the tensorrt runner with the torch runner
# (tests/kernels/test_trt_runner_gpu.py -> OUTDIR/{trt_tests.log,trt_tests.xml}); else it is skipped.
#
#   benchmarks/gpu_check.sh OUTDIR [gpu_check.py flags, e.g. --compare-source DIR]
#   PYTHON=/path/to/python to choose the interpreter
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR [gpu_check.py flags]}
shift
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'
  "$PY" -c 'import cuda.core as c; print("cuda.core", getattr(c, "__version__", "?"))' 2>&1 | tail -1
  "$PY" -c 'import cuda.bindings as b; print("cuda.bindings", b.__version__)' 2>&1 | tail -1
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1 | tail -1
  "$PY" -c 'import tensorrt; print("tensorrt", tensorrt.__version__)' 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

tests_rc=0
if "$PY" -c 'import pytest' 2>/dev/null; then
  # Only the GPU files: the CPU ones import the gateway's optional dependencies.
  per_test=()
  "$PY" -c 'import pytest_timeout' 2>/dev/null && per_test=(--timeout 90)
  timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu "${per_test[@]}" \
    -o addopts="" --junitxml="$OUT/tests.xml" \
    tests/kernels/test_kernels_gpu.py tests/kernels/test_cuda_runner_gpu.py > "$OUT/tests.log" 2>&1
  tests_rc=$?
else
  echo "pytest not installed: kernel tests skipped (gpu_check.py still compares the runners)" > "$OUT/tests.log"
  tests_rc=3
fi
tail -n 40 "$OUT/tests.log"

trt_rc=0
if "$PY" -c 'import pytest, tensorrt, onnx, onnxscript' 2>/dev/null; then
  timeout 90 "$PY" -m pytest -q -p no:cacheprovider -m gpu -o addopts="" --junitxml="$OUT/trt_tests.xml" \
    tests/kernels/test_trt_runner_gpu.py 2>&1 | tail -n 40 > "$OUT/trt_tests.log"
  trt_rc=${PIPESTATUS[0]}
else
  echo "tensorrt, onnx or onnxscript not installed: TensorRT runner check skipped" > "$OUT/trt_tests.log"
fi
cat "$OUT/trt_tests.log"

timeout 150 "$PY" -m benchmarks.gpu_check --json "$OUT/gpu_check.json" "$@" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

{
  echo "tests rc=$tests_rc (0 ok, 3 no pytest, 124 timeout)  trt rc=$trt_rc  bench rc=$bench_rc (0 ok, 124 timeout)"
  grep -hE "goal|tok/s|GB/s|ERROR|passed|failed" "$OUT/bench.log" "$OUT/tests.log" "$OUT/trt_tests.log" | tail -n 20
} | tee "$OUT/summary.txt"
[ "$tests_rc" = 0 ] && [ "$trt_rc" = 0 ] && [ "$bench_rc" = 0 ]
