#!/usr/bin/env bash
# call 2: pigeon bench attention (the summary command), where the time goes per masked variant, S2 at 32k
set -uo pipefail
OUT=${OUT:-/tmp/pigeon_out}; mkdir -p "$OUT/r"
python -c "import tarfile; tarfile.open('.gpu/cache_attn.tar.xz').extractall('.gpu')"
export PIGEON_CACHE_DIR=$PWD/.gpu/cache_attn PIGEON_CUTLASS_INCLUDE=$PWD/.gpu/cutlass_include PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export PIGEON_COMMIT=$(cat .gpu/COMMIT)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nvcc --version | tail -1;
  python -c "import torch; print('torch', torch.__version__)"; echo "commit $PIGEON_COMMIT"; date -u; } | tee "$OUT/r/env.txt"
T0=$(date +%s)
timeout 300 python -m pigeon.cli bench attention --variants dense,causal,topk-g2,topk-g4,window,s2,alibi,softcap,document \
  --seq-lens 4096 --batch 4 --heads 32 --head-dims 128 --dtypes bfloat16 --modes forward,forward+backward \
  --peers sdpa,flex --window 1024 --reps 3 --timeout 60 --budget 1 --out "$OUT/r/attn" \
  > "$OUT/r/attn_stdout.md" 2> "$OUT/r/attn_progress.log"
echo "bench rc $? in $(( $(date +%s) - T0 )) s"; grep -E "^\| (dense|causal|topk|window|s2|alibi|softcap|document) " "$OUT/r/attn/cases.md" 2>/dev/null | cut -c1-260 || tail -5 "$OUT/r/attn_progress.log"
T0=$(date +%s)
timeout 130 python benchmarks/profile_attention.py --variants causal,window,s2,topk-g2,topk-g4,alibi,softcap --seq-lens 4096 \
  --head-dims 128 --forwards wgmma,cutlass --calls 10 --out "$OUT/r/profile" > "$OUT/r/profile.log" 2>&1
echo "profile rc $? in $(( $(date +%s) - T0 )) s"; cat "$OUT/r/profile/profile_attention.md" 2>/dev/null | cut -c1-200 || tail -20 "$OUT/r/profile.log"
T0=$(date +%s)
timeout 100 python -m pigeon.cli bench attention --variants causal,s2 --seq-lens 32768 --batch 1 --heads 8 --head-dims 128 \
  --dtypes bfloat16 --modes forward --peers sdpa --reps 3 --timeout 40 --budget 1 --out "$OUT/r/s2_32k" \
  > "$OUT/r/s2_32k_stdout.md" 2> "$OUT/r/s2_32k_progress.log"
echo "s2 32k rc $? in $(( $(date +%s) - T0 )) s"; grep -E "^\| (causal|s2) " "$OUT/r/s2_32k/cases.md" 2>/dev/null | cut -c1-200 || tail -5 "$OUT/r/s2_32k_progress.log"
cd "$OUT" && tar czf r.tgz r && rm -rf r
exit 0
