#!/usr/bin/env bash
# call 4: top-k with its lists kept (reused selection) and built per call (a fresh selection each call);
# the bench's top-k cases again, resumed into call 3's results, and its compile-time step
set -uo pipefail
OUT=${OUT:-/tmp/pigeon_out}; mkdir -p "$OUT/r"
python -c "import tarfile; tarfile.open('.gpu/cache_attn.tar.xz').extractall('.gpu')"
export PIGEON_CACHE_DIR=$PWD/.gpu/cache_attn PIGEON_CUTLASS_INCLUDE=$PWD/.gpu/cutlass_include PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export PIGEON_COMMIT=$(cat .gpu/COMMIT)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; echo "commit $PIGEON_COMMIT"; date -u; } | tee "$OUT/r/env.txt"
timeout 90 python - > "$OUT/r/topk_fresh_vs_reused.txt" 2>&1 <<'PY'
import torch, pigeon.attention as pa
from pigeon.bench.attn_variants import make_problem
from pigeon.timing import median_ms
from torch.profiler import profile, ProfilerActivity
dev = torch.device("cuda")
for variant in ("topk-g2", "topk-g4"):
    p = make_problem(variant, 4, 32, 4096, 128, torch.bfloat16, dev, 1024)
    kw = p.pigeon_kwargs()
    sel = kw["pattern"]
    reuse = lambda: pa.attention(p.q, p.k, p.v, **kw)
    def fresh():
        return pa.attention(p.q, p.k, p.v, **dict(kw, pattern=pa.TopK(sel.indices.clone(), sel.block_m, sel.block_n)))
    for name, fn in (("reused selection", reuse), ("fresh selection per call", fresh)):
        fn(); torch.cuda.synchronize()
        ms = median_ms(fn, dev, warmup=3, reps=10)[0]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        kern = sum(e.self_device_time_total for e in prof.key_averages()) / 5 / 1e3
        print(f"{variant} B4 H32 S4096 D128 bf16 forward, {name}: wall {ms:.3f} ms, GPU kernels {kern:.3f} ms per call", flush=True)
PY
echo "probe rc $?"; cat "$OUT/r/topk_fresh_vs_reused.txt" | grep -v Warn | tail -6
cp -r .gpu/attn_resume "$OUT/r/attn"
T0=$(date +%s)
timeout 260 python -m pigeon.cli bench attention --variants dense,causal,topk-g2,topk-g4,window,s2,alibi,softcap,document \
  --seq-lens 4096 --batch 4 --heads 32 --head-dims 128 --dtypes bfloat16 --modes forward,forward+backward \
  --peers sdpa,flex --window 1024 --reps 3 --timeout 60 --budget 1 --out "$OUT/r/attn" --resume \
  --gemm-summary benchmarks/results/gemm/summary.json > "$OUT/r/attn_stdout.md" 2> "$OUT/r/attn_progress.log"
echo "bench rc $? in $(( $(date +%s) - T0 )) s"; tail -8 "$OUT/r/attn_progress.log" | cut -c1-250
cd "$OUT" && tar czf r.tgz r && rm -rf r
exit 0
