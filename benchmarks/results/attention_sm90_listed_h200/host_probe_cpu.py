import time, torch, pigeon.attention as pa
import pigeon.runtime.attention_sm90 as rs9
import pigeon.runtime.attention_kernel as ak
import pigeon.attention.ops as ops
class Lib:
    def run(self, ptrs, sizes, ws, stream): pass
rs9._library = lambda spec: Lib(); rs9._call_library.cache_clear()
rs9._raw_stream = lambda dev: 0
torch.cuda.current_device = lambda: 0
ak._runs_cutlass = lambda inst, q, k: True
ak.kernel_variant = lambda inst, emulate, backward=False: "mma"
ops.where = lambda device: "cuda"
B,H,S,D=1,4,256,128
q=torch.randn(B,H,S,D,dtype=torch.bfloat16); k=torch.randn(B,H,S,D,dtype=torch.bfloat16); v=k.clone()
for kw in (dict(), dict(pattern=pa.Causal()), dict(pattern=pa.SlidingWindow(100))):
    for _ in range(5): pa.attention(q,k,v,**kw)
    n=500; t0=time.perf_counter()
    for _ in range(n): pa.attention(q,k,v,**kw)
    print(list(kw.values()), f"{(time.perf_counter()-t0)/n*1e6:.1f} us per call")
import cProfile, pstats
cProfile.run("for _ in range(2000): pa.attention(q,k,v,pattern=pa.Causal())", "/tmp/prof.out")
pstats.Stats("/tmp/prof.out").sort_stats("tottime").print_stats(22)
