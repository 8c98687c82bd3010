#!/usr/bin/env bash
set -uo pipefail
OUT=${OUT:-/tmp/pigeon_out}; mkdir -p "$OUT/r"
[ -d .gpu/cache_attn ] || python -c "import tarfile; tarfile.open('.gpu/cache_attn.tar.xz').extractall('.gpu')"
export PIGEON_CACHE_DIR=$PWD/.gpu/cache_attn PIGEON_CUTLASS_INCLUDE=$PWD/.gpu/cutlass_include PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 60 python - > "$OUT/r/topk_fresh_slow_ops.txt" 2>&1 <<'PY'
import torch, pigeon.attention as pa
from pigeon.bench.attn_variants import make_problem
from torch.profiler import profile, ProfilerActivity
dev = torch.device("cuda")
p = make_problem("topk-g2", 4, 32, 4096, 128, torch.bfloat16, dev, 1024)
kw = p.pigeon_kwargs(); sel = kw["pattern"]
print("indices", sel.indices.device, sel.indices.dtype, tuple(sel.indices.shape))
fresh = lambda: pa.attention(p.q, p.k, p.v, **dict(kw, pattern=pa.TopK(sel.indices.clone(), sel.block_m, sel.block_n)))
for _ in range(3): fresh()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU], with_stack=True, record_shapes=True) as prof:
    fresh(); torch.cuda.synchronize()
for e in sorted(prof.events(), key=lambda e: -e.cpu_time_total)[:40]:
    if e.name in ("aten::copy_", "aten::clone", "aten::_to_copy", "aten::sort", "aten::index", "aten::nonzero") and e.cpu_time_total > 60:
        st = [s for s in (e.stack or []) if "pigeon" in s][:4]
        print(f"{e.name} {e.cpu_time_total:.0f}us shapes={e.input_shapes} | " + " <- ".join(st))
PY
echo "rc $?"; grep -v Warn "$OUT/r/topk_fresh_slow_ops.txt" | head -40 | cut -c1-330
cd "$OUT" && tar czf r.tgz r && rm -rf r
exit 0
