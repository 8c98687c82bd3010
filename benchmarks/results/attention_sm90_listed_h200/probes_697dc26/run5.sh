#!/usr/bin/env bash
# call 5: where a fresh top-k selection's host time goes (torch.profiler, by Python stack)
set -uo pipefail
OUT=${OUT:-/tmp/pigeon_out}; mkdir -p "$OUT/r"
python -c "import tarfile; tarfile.open('.gpu/cache_attn.tar.xz').extractall('.gpu')"
export PIGEON_CACHE_DIR=$PWD/.gpu/cache_attn PIGEON_CUTLASS_INCLUDE=$PWD/.gpu/cutlass_include PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 70 python - > "$OUT/r/topk_fresh_stacks.txt" 2>&1 <<'PY'
import time, torch, pigeon.attention as pa
from pigeon.bench.attn_variants import make_problem
from torch.profiler import profile, ProfilerActivity
dev = torch.device("cuda")
p = make_problem("topk-g2", 4, 32, 4096, 128, torch.bfloat16, dev, 1024)
kw = p.pigeon_kwargs(); sel = kw["pattern"]
fresh = lambda: pa.attention(p.q, p.k, p.v, **dict(kw, pattern=pa.TopK(sel.indices.clone(), sel.block_m, sel.block_n)))
for _ in range(3): fresh()
torch.cuda.synchronize()
t0 = time.perf_counter(); fresh(); t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
print(f"host {1e3*(t1-t0):.3f} ms, to idle {1e3*(t2-t0):.3f} ms (an idle GPU before the call)")
with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
    fresh(); torch.cuda.synchronize()
print(prof.key_averages(group_by_stack_n=6).table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=40))
PY
echo "rc $?"; grep -v Warn "$OUT/r/topk_fresh_stacks.txt" | head -60 | cut -c1-230
cd "$OUT" && tar czf r.tgz r && rm -rf r
exit 0
