#!/usr/bin/env bash
# call 3: S2 on its chosen key tile (GPU tests), top-k's host time by op, tile A/B, S2 at 32k, the summary bench
set -uo pipefail
OUT=${OUT:-/tmp/pigeon_out}; mkdir -p "$OUT/r"
python -c "import tarfile; tarfile.open('.gpu/cache_attn.tar.xz').extractall('.gpu')"
export PIGEON_CACHE_DIR=$PWD/.gpu/cache_attn PIGEON_CUTLASS_INCLUDE=$PWD/.gpu/cutlass_include PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export PIGEON_COMMIT=$(cat .gpu/COMMIT)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nvcc --version | tail -1;
  python -c "import torch; print('torch', torch.__version__)"; echo "commit $PIGEON_COMMIT"; date -u; } | tee "$OUT/r/env.txt"
T0=$(date +%s)
PIGEON_SM90_TEST_PREBUILD=0 timeout 90 python -m pytest -m gpu tests/gpu/test_attention_sm90_gpu.py -k "s2" -q -rfEs \
  -p no:cacheprovider -n 3 > "$OUT/r/gpu_tests_sm90_s2.log" 2>&1
echo "tests rc $? in $(( $(date +%s) - T0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/r/gpu_tests_sm90_s2.log" | cut -c1-300 | tail -8
timeout 60 python - > "$OUT/r/topk_host_profile.txt" 2>&1 <<'PY'
import torch, pigeon.attention as pa
from pigeon.bench.attn_variants import make_problem
from torch.profiler import profile, ProfilerActivity
p = make_problem("topk-g2", 4, 32, 4096, 128, torch.bfloat16, "cuda", 1024)
kw = p.pigeon_kwargs()
for _ in range(3):
    pa.attention(p.q, p.k, p.v, **kw)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    pa.attention(p.q, p.k, p.v, **kw)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
PY
echo "topk host profile rc $?"; head -30 "$OUT/r/topk_host_profile.txt" | cut -c1-160
T0=$(date +%s)
timeout 80 python benchmarks/profile_attention.py --variants s2,window --seq-lens 4096 --head-dims 128 \
  --forwards wgmma,cutlass,cutlass:bn64,cutlass:bn128 --calls 10 --out "$OUT/r/profile_tiles" > "$OUT/r/profile_tiles.log" 2>&1
echo "profile rc $? in $(( $(date +%s) - T0 )) s"; grep "^|" "$OUT/r/profile_tiles/profile_attention.md" 2>/dev/null | cut -c1-150 || tail -5 "$OUT/r/profile_tiles.log"
T0=$(date +%s)
timeout 80 python -m pigeon.cli bench attention --variants causal,s2 --seq-lens 32768 --batch 1 --heads 8 --head-dims 128 \
  --dtypes bfloat16 --modes forward --peers sdpa --reps 3 --timeout 40 --budget 1 --out "$OUT/r/s2_32k" \
  > "$OUT/r/s2_32k_stdout.md" 2> "$OUT/r/s2_32k_progress.log"
echo "s2 32k rc $? in $(( $(date +%s) - T0 )) s"; grep -E "^\| (causal|s2) " "$OUT/r/s2_32k/cases.md" 2>/dev/null | cut -c1-200 || tail -5 "$OUT/r/s2_32k_progress.log"
T0=$(date +%s)
timeout 290 python -m pigeon.cli bench attention --variants dense,causal,topk-g2,topk-g4,window,s2,alibi,softcap,document \
  --seq-lens 4096 --batch 4 --heads 32 --head-dims 128 --dtypes bfloat16 --modes forward,forward+backward \
  --peers sdpa,flex --window 1024 --reps 3 --timeout 60 --budget 1 --out "$OUT/r/attn" \
  > "$OUT/r/attn_stdout.md" 2> "$OUT/r/attn_progress.log"
echo "bench rc $? in $(( $(date +%s) - T0 )) s"; grep -E "^\| (s2|window|topk-g2) " "$OUT/r/attn/cases.md" 2>/dev/null | cut -c1-200 || tail -5 "$OUT/r/attn_progress.log"
cd "$OUT" && tar czf r.tgz r && rm -rf r
exit 0
