#!/usr/bin/env bash
# One short, prepared run on a many-core machine (e.g. a lent 16-core box): build, the
# kernel tests under every SIMD variant the CPU supports, then GEMM / norm / op / encoder
# figures at 1, 2 and all threads, and the GEMM / encoder at 4 and 8 threads (OpenMP scaling
# beyond 2 cores), after bench/align_check.py's misalignment costs.  Everything lands in
# ${OUT:-/tmp/normcy-dev} as it is produced (log.txt, bench.md/.json, scale.md/.json), so a
# run cut short still leaves what it measured.
# Needs: a C compiler with OpenMP, Cython, NumPy, pytest, hypothesis (pytest-xdist, torch and
# onnxruntime optional).  The MiniLM model is not needed (those suites are left out).
set -uo pipefail
OUT="${OUT:-/tmp/normcy-dev}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
lscpu | grep -E "Model name|^CPU\(s\)|Thread|L2|L3|Flags" | cut -c1-400
git log -1 --format='commit %h %s' 2>/dev/null | cut -c1-100
t0=$(date +%s)
$PY setup.py build_ext --inplace -j "$(nproc)" > "$OUT/build.txt" 2>&1 || { tail -30 "$OUT/build.txt"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
$PY -c "import normcy; normcy.show_config()"
KT="tests/test_norms.py tests/test_ops.py tests/test_gemm.py tests/test_properties.py \
tests/test_extremes.py tests/test_batchnorm.py tests/test_streaming.py tests/test_transformer.py \
tests/test_batch_invariance.py tests/test_threads.py tests/test_hardening.py"
XD=""
$PY -c "import xdist" 2>/dev/null && XD="-n 8"
for isa in $($PY -c "import normcy._norms as n; print(' '.join(n.isa_info()['supported']))"); do
  t1=$(date +%s)
  echo "== kernel tests, NORMCY_MAX_ISA=$isa"
  NORMCY_MAX_ISA=$isa timeout 240 $PY -m pytest -q -x -p no:cacheprovider $XD $KT 2>&1 | tail -4
  echo "   ($(( $(date +%s) - t1 )) s)"
done
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
# what a 16-byte-misaligned array costs each row kernel here (split cache lines)
timeout 90 $PY bench/align_check.py --threads "1,$(nproc)" --reps 9
ONLY="${BENCH_ONLY:-ops,gemm,encoder,add_layer_norm,layer_norm,rms_norm,batch_norm}"
THREADS="${BENCH_THREADS:-1,2,$(nproc)}"
t1=$(date +%s)
timeout 330 $PY bench/run.py --quick --only "$ONLY" --threads "$THREADS" --no-progress \
  --json "$OUT/bench.json" --md "$OUT/bench.md" > "$OUT/bench.out.txt" 2>&1
echo "bench rc=$? ($(( $(date +%s) - t1 )) s)"
t1=$(date +%s)
timeout 120 $PY bench/run.py --quick --only gemm,encoder --threads 4,8 --no-progress \
  --json "$OUT/scale.json" --md "$OUT/scale.md" > "$OUT/scale.out.txt" 2>&1
echo "scaling bench rc=$? ($(( $(date +%s) - t1 )) s)"
grep -A200 "speed targets\|Issue-3 targets" "$OUT/bench.md" | head -80
