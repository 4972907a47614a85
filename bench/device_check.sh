#!/usr/bin/env bash
# One short, prepared run on a many-core machine (e.g. a lent 16-core box): build, kernel
# tests under every SIMD variant the CPU supports, then GEMM / norm / encoder figures at
# several thread counts (OpenMP scaling beyond 2 cores).  Writes into ${OUT:-/tmp/normcy-dev}.
# Needs: a C compiler with OpenMP, Cython, NumPy, pytest, hypothesis (torch/onnxruntime
# optional).  The MiniLM model is not needed (those suites are left out).
set -uo pipefail
OUT="${OUT:-/tmp/normcy-dev}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-200 | tee "$OUT/cpu.txt"
t0=$(date +%s)
$PY setup.py build_ext --inplace -j "$(nproc)" > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
$PY -c "import normcy; normcy.show_config()"
KT="tests/test_norms.py tests/test_ops.py tests/test_gemm.py tests/test_properties.py tests/test_extremes.py tests/test_batchnorm.py tests/test_streaming.py tests/test_transformer.py"
for isa in $($PY -c "import normcy._norms as n; print(' '.join(n._isa_info()['supported']))"); do
  echo "== kernel tests, NORMCY_MAX_ISA=$isa"
  NORMCY_MAX_ISA=$isa timeout 300 $PY -m pytest -q -x -p no:cacheprovider $KT 2>&1 | tail -2
done
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
ONLY="${BENCH_ONLY:-ops,gemm,encoder,add_layer_norm,layer_norm,rms_norm,batch_norm}"
THREADS="${BENCH_THREADS:-1,2,$(nproc)}"
timeout 300 $PY bench/run.py --quick --only "$ONLY" --threads "$THREADS" --no-progress \
  --json "$OUT/bench.json" --md "$OUT/bench.md" > "$OUT/bench.out" 2>&1
echo "bench rc=$?"
# the AVX2 variant on the same CPU (a proxy for its register pressure, not for AMD timings)
if $PY -c "import normcy._norms as n, sys; sys.exit('avx512' not in n._isa_info()['supported'])"; then
  NORMCY_MAX_ISA=avx2 timeout 150 $PY bench/run.py --quick --only gemm,encoder --threads "1,$(nproc)" \
    --no-progress --json "$OUT/bench-avx2.json" --md "$OUT/bench-avx2.md" > "$OUT/bench-avx2.out" 2>&1
  echo "bench (avx2 variant) rc=$?"
fi
grep -A200 "speed targets\|Issue-3 targets" "$OUT/bench.md" | head -80
