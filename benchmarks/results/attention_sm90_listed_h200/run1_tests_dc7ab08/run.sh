#!/usr/bin/env bash
# call 1: the CUTLASS sm90 attention GPU tests (their libraries built here in parallel first)
set -uo pipefail
OUT=${OUT:-/tmp/pigeon_out}; mkdir -p "$OUT/r"
export PIGEON_CACHE_DIR=$PWD/.gpu/cache_dev PIGEON_CUTLASS_INCLUDE=$PWD/.gpu/cutlass_include PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export PIGEON_COMMIT=$(cat .gpu/COMMIT)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nvcc --version | tail -1;
  python -c "import torch; print('torch', torch.__version__)"; echo "commit $PIGEON_COMMIT"; date -u; nproc; } | tee "$OUT/r/env.txt"
T0=$(date +%s)
timeout 540 python -m pytest -m gpu tests/gpu/test_attention_sm90_gpu.py -q -rfEs -p no:cacheprovider -n 4 \
  > "$OUT/r/gpu_tests_sm90.log" 2>&1
echo "tests rc $? in $(( $(date +%s) - T0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed|rror" "$OUT/r/gpu_tests_sm90.log" | cut -c1-400 | tail -40
ls $PIGEON_CACHE_DIR | wc -l
cd "$OUT" && tar czf r.tgz r && rm -rf r
exit 0
