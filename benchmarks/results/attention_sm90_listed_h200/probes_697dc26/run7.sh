#!/usr/bin/env bash
set -uo pipefail
OUT=${OUT:-/tmp/pigeon_out}; mkdir -p "$OUT/r"
[ -d .gpu/cache_attn ] || python -c "import tarfile; tarfile.open('.gpu/cache_attn.tar.xz').extractall('.gpu')"
export PIGEON_CACHE_DIR=$PWD/.gpu/cache_attn PIGEON_CUTLASS_INCLUDE=$PWD/.gpu/cutlass_include PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 60 python - > "$OUT/r/topk_fresh_split.txt" 2>&1 <<'PY'
import time, torch, pigeon.attention as pa
from pigeon.bench.attn_variants import make_problem
from pigeon.attention import api
dev = torch.device("cuda")
p = make_problem("topk-g2", 4, 32, 4096, 128, torch.bfloat16, dev, 1024)
kw = p.pigeon_kwargs(); sel = kw["pattern"]
pats = [pa.TopK(sel.indices.clone(), sel.block_m, sel.block_n) for _ in range(30)]   # made before timing
torch.cuda.synchronize()
def t(fn, n=10):
    out = []
    for i in range(n):
        torch.cuda.synchronize(); t0 = time.perf_counter(); fn(i); t1 = time.perf_counter(); torch.cuda.synchronize()
        out.append((t1 - t0) * 1e3)
    out.sort(); return out[len(out) // 2]
print(f"clone alone: {t(lambda i: sel.indices.clone()):.3f} ms host")
print(f"block lists (fresh): {t(lambda i: api.block_lists(pats[i], 4, 32, 4096, 4096, 64, 64, dev)):.3f} ms host")
from pigeon.runtime.attention_tiles import tile_lists
L = [api.block_lists(pats[20 + i % 10], 4, 32, 4096, 4096, 64, 64, dev) for i in range(10)]
print(f"tile lists (fresh): {t(lambda i: tile_lists(L[i], 64, 64, 4096, 4096, 128, 128)):.3f} ms host")
for _ in range(3): pa.attention(p.q, p.k, p.v, **dict(kw, pattern=pats[29]))
print(f"attention, fresh pattern made beforehand: {t(lambda i: pa.attention(p.q, p.k, p.v, **dict(kw, pattern=pats[i + 10])), 10):.3f} ms host")
print(f"attention, reused: {t(lambda i: pa.attention(p.q, p.k, p.v, **kw)):.3f} ms host")
PY
echo "rc $?"; grep -v Warn "$OUT/r/topk_fresh_split.txt" | tail -8
cd "$OUT" && tar czf r.tgz r && rm -rf r
exit 0
