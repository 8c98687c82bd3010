#!/usr/bin/env bash
# run 8: the CUTLASS sm90 attention forward (attention.sm90.cu.jinja): its GPU tests, wgmma vs cutlass kernel times
set -uo pipefail
OUT=${OUT:-/tmp/pigeon_out}; mkdir -p "$OUT/r"
python -c "import tarfile; tarfile.open('.gpu/cache_attn.tar.xz').extractall('.gpu')"
export PIGEON_CACHE_DIR=$PWD/.gpu/cache_attn PIGEON_CUTLASS_INCLUDE=$PWD/.gpu/cutlass_include PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export PIGEON_COMMIT=$(cat .gpu/COMMIT)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nvcc --version | tail -1;
  python -c "import torch; print('torch', torch.__version__)"; echo "commit $PIGEON_COMMIT"; date -u; } | tee "$OUT/r/env.txt"
T0=$(date +%s)
timeout 190 python -m pytest -m gpu tests/gpu/test_attention_sm90_gpu.py -q -rfEs -p no:cacheprovider -n 4 \
  > "$OUT/r/gpu_tests_sm90.log" 2>&1
echo "tests rc $? in $(( $(date +%s) - T0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed|Error" "$OUT/r/gpu_tests_sm90.log" | tail -30
T0=$(date +%s)
timeout 180 python benchmarks/profile_attention.py --variants dense,causal --seq-lens 1024,4096,16384 --head-dims 64,128 \
  --forwards wgmma,cutlass,cutlass:bn128 --calls 10 --out "$OUT/r/profile" > "$OUT/r/profile.log" 2>&1
echo "profile rc $? in $(( $(date +%s) - T0 )) s"; cat "$OUT/r/profile/profile_attention.md" 2>/dev/null || tail -20 "$OUT/r/profile.log"
T0=$(date +%s)
timeout 130 python -m pigeon.cli bench attention --variants dense,causal --seq-lens 4096 --batch 4 --heads 32 --head-dims 128 \
  --dtypes float16 --modes forward,forward+backward --peers sdpa --device cuda --reps 5 --timeout 40 --budget 1 \
  --out "$OUT/r/attn_fp16" > "$OUT/r/attn_fp16_stdout.md" 2> "$OUT/r/attn_fp16_progress.log"
echo "bench fp16 rc $? in $(( $(date +%s) - T0 )) s"; grep -E "^\| (dense|causal)" "$OUT/r/attn_fp16/cases.md" 2>/dev/null | cut -c1-400 || tail -5 "$OUT/r/attn_fp16_progress.log"
cd "$OUT" && tar czf r.tgz r && rm -rf r
exit 0
