#!/usr/bin/env bash
# One GPU session on the H200 (device tool): GPU tests of the models, then the benchmark.
# Expects .gpu/ carried: cache/ (prebuilt cubins), datasets/, artifact_rgat/, COMMIT.
set -uo pipefail
OUT=${OUT:-/tmp/pigeon_out}; mkdir -p "$OUT"
export PIGEON_CACHE_DIR=$PWD/.gpu/cache PIGEON_DATA=$PWD/.gpu/datasets PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export PIGEON_COMMIT=$(cat .gpu/COMMIT 2>/dev/null || echo unknown) PIGEON_TEST_ARTIFACT=$PWD/.gpu/artifact_rgat
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nvcc --version | tail -1;
  python -c "import torch; print('torch', torch.__version__)"; echo "commit $PIGEON_COMMIT"; date -u; } | tee "$OUT/env.txt"
timeout ${PREBUILD_S:-120} python scripts/prebuild_kernels.py --jobs 16 --dims 64 2>&1 | tail -3
# the whole log goes to a file first: a pipe that closes early (head) would kill pytest with SIGPIPE
timeout ${TESTS_S:-300} python -m pytest -m gpu ${TESTS:-tests/gpu/test_models_gpu.py} -q -rfEs -p no:cacheprovider \
  ${PYTEST_ARGS:-} > "$OUT/gpu_tests.log" 2>&1
grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/gpu_tests.log" | tail -40
[ "${BENCH:-1}" = 1 ] && timeout ${BENCH_S:-240} python benchmarks/bench_rgnn.py --graph fb15k-237 --reverse --dim 64 \
  --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30
exit 0
