# where a pigeon.attention call's host time goes on the GPU machine (cProfile), default forward (auto) and mma
import cProfile, io, os, pstats, sys, time, torch
sys.path.insert(0, os.getcwd())
import pigeon.attention as pa
from pigeon.attention.api import _plan
from pigeon.codegen import attention_mma, attention_wgmma
from pigeon.runtime.build import build_kernels
q = torch.empty(4, 32, 1024, 64, dtype=torch.bfloat16)
inst = _plan(q, q, q, None, None, None, None)[0]
print("build:", build_kernels([attention_wgmma.render_attention_wgmma(inst, ""), attention_mma.render_attention_mma(inst)], jobs=16) or "ok", flush=True)
dev = torch.device("cuda")
q, k, v = (torch.randn(4, 32, 1024, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
out = sys.argv[1]
for fw in ("auto", "mma"):
    os.environ["PIGEON_ATTN_FORWARD"] = fw
    with torch.no_grad():
        for _ in range(5):
            pa.attention(q, k, v)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(200):
            pa.attention(q, k, v)
        host = (time.perf_counter() - t) / 200 * 1e6
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(200):
            pa.attention(q, k, v)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 200 * 1e6
        pr = cProfile.Profile(); pr.enable()
        for _ in range(200):
            pa.attention(q, k, v)
        pr.disable(); torch.cuda.synchronize()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
    s2 = io.StringIO(); pstats.Stats(pr, stream=s2).sort_stats("cumulative").print_stats(22)
    text = f"## forward {fw}: host {host:.1f} us per call (enqueue, no wait), back-to-back wall {wall:.1f} us per call\n{s.getvalue()}\n{s2.getvalue()}"
    print(text[:6000], flush=True)
    open(os.path.join(out, f"attn_host_{fw}.txt"), "w").write(text)
