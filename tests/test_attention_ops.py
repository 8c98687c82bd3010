"""pigeon.attention as torch ops (pigeon/attention/ops.py): pigeon::attention_fwd / attention_bwd /
attention_block_lists pass torch.library.opcheck on a CPU (the semantics path, and one case with
the emulated kernels), outputs and gradients equal the reference, fake tensors give the runtime's
shapes, and torch.compile(fullgraph=True) traces a causal call with a score_mod."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pigeon.attention as pa
from pigeon.attention import api
from pigeon.runtime import emulate


def alibi(s, b, h, q, kv):
    return s + pa.exp((h + 1) * -0.5) * (kv - q)


def strided(b, h, q, kv):
    return ((kv // 8 + h) % 2 == 0) | (q == kv)


CASES = {
    "dense": dict(),
    "causal": dict(pattern=pa.Causal()),
    "gqa_window": dict(pattern=pa.SlidingWindow(11), gqa=True),
    "alibi_causal": dict(pattern=pa.Causal(), score_mod=alibi),
    "mask_mod_gqa": dict(mask_mod=strided, gqa=True),
    "packed_causal_alibi": dict(pattern=pa.Causal(), score_mod=alibi, packed=True, gqa=True),
    "topk": dict(topk=True, gqa=True),
}


def _inputs(case, seed=0, S=70, Skv=None, D=64):
    g = torch.Generator().manual_seed(seed)
    hq, hk = (4, 2) if case.get("gqa") else (2, 2)
    kw = {n: case[n] for n in ("pattern", "score_mod", "mask_mod") if n in case}
    if case.get("packed"):
        lens = [9, 1, 30, 0, 17]
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
        q, k, v = (torch.randn(sum(lens), h, D, generator=g).bfloat16() for h in (hq, hk, hk))
        kw["cu_seqlens"] = cu
    else:
        Skv = S if Skv is None else Skv
        q = torch.randn(2, hq, S, D, generator=g).bfloat16()
        k, v = (torch.randn(2, hk, Skv, D, generator=g).bfloat16() for _ in range(2))
        if case.get("topk"):
            nq, nk = -(-S // 16), -(-Skv // 16)
            idx = torch.randint(-1, nk, (2, hk, nq, 2), generator=g)
            kw["pattern"] = pa.TopK(idx, 16, 16)
    return q, k, v, kw


def _fwd_args(q, k, v, kw):
    return api._op_args(q, k, v, kw.get("score_mod"), kw.get("mask_mod"), kw.get("pattern"), q.shape[-1] ** -0.5,
                        kw.get("cu_seqlens"))


def _opcheck_both(q, k, v, kw):
    args = _fwd_args(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), kw)
    torch.library.opcheck(torch.ops.pigeon.attention_fwd.default, args)
    with torch.no_grad():
        out, lse = torch.ops.pigeon.attention_fwd(*args)
    text, q, k, v, ptr, col, full, shape, cu, scale = args
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    bwd = (text, g, q.detach(), k.detach(), v.detach(), out, lse, ptr, col, full, shape, cu, scale)
    torch.library.opcheck(torch.ops.pigeon.attention_bwd.default, bwd)


@pytest.mark.parametrize("name", sorted(CASES))
def test_ops_pass_opcheck_in_the_semantics_path(name, monkeypatch):
    monkeypatch.setenv("PIGEON_CPU_BACKEND", "torch")
    _opcheck_both(*_inputs(CASES[name]))


def test_block_lists_op_passes_opcheck():
    for p in (pa.Causal(), pa.SlidingWindow(20, causal=False), pa.S2(stride=3, local_blocks=1, block=16)):
        bm = p.block if isinstance(p, pa.S2) else 64
        torch.library.opcheck(torch.ops.pigeon.attention_block_lists.default,
                              (api._pattern_text(p), torch.empty(0), 2, 4, 70, 70, bm, bm))


@pytest.mark.skipif(not emulate.available(), reason="no C++ compiler for the CUDA emulation")
def test_ops_pass_opcheck_with_the_emulated_kernels(monkeypatch):
    monkeypatch.setenv("PIGEON_CPU_BACKEND", "emulate")
    _opcheck_both(*_inputs(dict(pattern=pa.Causal(), score_mod=alibi, gqa=True), S=20, Skv=27))


def _rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_and_gradients_equal_the_reference(name, monkeypatch):
    """The forward is the reference's computation (bitwise in bf16); the gradients (float32
    formulas, rounded once to bf16) match the float64 reference's to bf16 precision."""
    monkeypatch.setenv("PIGEON_CPU_BACKEND", "torch")
    q, k, v, kw = _inputs(CASES[name], seed=5)
    gqa = q.shape[-2 if "cu_seqlens" in kw else 1] != k.shape[-2 if "cu_seqlens" in kw else 1]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.clone().double().requires_grad_() for t in (q, k, v)]
    out, lse = pa.attention(*leaves, enable_gqa=gqa, return_lse=True, **kw)
    ref_bf16, ref_lse = pa.attention(q, k, v, enable_gqa=gqa, return_lse=True, backend="reference", **kw)
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    torch.testing.assert_close(out, ref_bf16, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=0, atol=0)
    ref = pa.attention(*ref_leaves, enable_gqa=gqa, backend="reference", **kw)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    for n, got, want in zip("qkv", torch.autograd.grad((out * up).sum(), leaves),
                            torch.autograd.grad((ref * up.double()).sum(), ref_leaves)):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        assert _rel_err(got, want) < 1e-2, f"{name} d{n}: rel err {_rel_err(got, want):.2e}"


@pytest.mark.parametrize("name", ["causal", "packed_causal_alibi", "topk"])
def test_eager_path_equals_the_op_path(name, monkeypatch):
    """The eager path (no op dispatch: ops.EagerAttention, or the forward alone without grad) gives
    the op path's outputs and gradients bit for bit, and takes the op only when told to."""
    from pigeon.attention import ops
    monkeypatch.setenv("PIGEON_CPU_BACKEND", "torch")
    q, k, v, kw = _inputs(CASES[name], seed=7)
    gqa = q.shape[-2 if "cu_seqlens" in kw else 1] != k.shape[-2 if "cu_seqlens" in kw else 1]
    up = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(3)).bfloat16()
    calls = {"op": 0}
    real = torch.ops.pigeon.attention_fwd

    class Spy:
        def __getattr__(self, name):
            if name == "attention_fwd":
                calls["op"] += 1
                return real
            return getattr(torch.ops.pigeon, name)
    monkeypatch.setattr(ops, "OPS", Spy())
    results = []
    for fastpath in ("1", "0"):
        monkeypatch.setenv("PIGEON_EAGER_FASTPATH", fastpath)
        before = calls["op"]
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = pa.attention(*leaves, enable_gqa=gqa, return_lse=True, **kw)
        grads = torch.autograd.grad((out * up).sum(), leaves)
        with torch.no_grad():
            plain = pa.attention(q, k, v, enable_gqa=gqa, **kw)
        assert (calls["op"] - before == 0) == (fastpath == "1")
        results.append((out, lse, plain, grads))
    (o1, l1, p1, g1), (o0, l0, p0, g0) = results
    for a, b in [(o1, o0), (l1, l0), (p1, p0), *zip(g1, g0)]:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_semantics_backward_equals_the_vjp_in_float64(name):
    """The bwd op's formulas against torch.func.vjp of the forward semantics (float64)."""
    from pigeon.attention import ops
    q, k, v, kw = _inputs(CASES[name], seed=9)
    text, q, k, v, ptr, col, full, shape, cu, scale = _fwd_args(q, k, v, kw)
    inst = ops.parse(text)
    q, k, v = (t.double() for t in (q, k, v))
    g = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _, vjp = torch.func.vjp(lambda a, b, c: ops.semantics(inst, a, b, c, ptr, col, full, shape, cu, scale)[0], q, k, v)
    for got, want in zip(ops.semantics_backward(inst, g, q, k, v, ptr, col, full, shape, cu, scale), vjp(g)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_fake_tensor_shapes():
    q, k, v, kw = _inputs(CASES["gqa_window"], S=70, Skv=90)
    args = _fwd_args(q, k, v, kw)
    qp, kp, vp, kwp = _inputs(CASES["packed_causal_alibi"])
    pargs = _fwd_args(qp, kp, vp, kwp)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fa = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        out, lse = torch.ops.pigeon.attention_fwd(*fa)
        assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((2, 4, 70, 64), torch.bfloat16, (2, 4, 70), torch.float32)
        dq, dk, dv = torch.ops.pigeon.attention_bwd(fa[0], out, *fa[1:4], out, lse, *fa[4:])
        assert (dq.shape, dk.shape, dv.shape) == ((2, 4, 70, 64), (2, 2, 90, 64), (2, 2, 90, 64))
        fp = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in pargs)
        out, lse = torch.ops.pigeon.attention_fwd(*fp)
        assert (out.shape, lse.shape, lse.dtype) == ((57, 4, 64), (4, 57), torch.float32)
        # pigeon.attention itself with no pattern (its lists are plain torch ops) under fake tensors
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        out = pa.attention(fq, fk, fv, enable_gqa=True, score_mod=alibi)
        assert out.shape == (2, 4, 70, 64)


def test_torch_compile_fullgraph_causal_with_a_score_mod(monkeypatch):
    monkeypatch.setenv("PIGEON_CPU_BACKEND", "torch")
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()

    def f(q, k, v):
        return pa.attention(q, k, v, pattern=pa.Causal(), score_mod=alibi, enable_gqa=True)

    cnt = CompileCounterWithBackend("aot_eager")
    cf = torch.compile(f, backend=cnt, fullgraph=True)
    for S in (70, 70, 90, 100):                     # a new length once: one recompile, dynamic from then on
        q, k, v, _ = _inputs(dict(gqa=True), seed=S, S=S)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        got = cf(*leaves)
        want = f(*leaves)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for a, b in zip(torch.autograd.grad(got.float().sum(), leaves), torch.autograd.grad(want.float().sum(), leaves)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert cnt.frame_count == 2
    names = {str(n.target) for gm in cnt.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert {"pigeon.attention_block_lists", "pigeon.attention_fwd"} <= {n.split(".default")[0] for n in names}, names


def test_torch_compile_inductor_fullgraph(monkeypatch):
    monkeypatch.setenv("PIGEON_CPU_BACKEND", "torch")
    torch._dynamo.reset()
    window = pa.SlidingWindow(20)       # made outside: dynamo cannot build a frozen dataclass with __post_init__

    def f(q, k, v):
        return pa.attention(q, k, v, pattern=window, mask_mod=strided) * 2

    q, k, v, _ = _inputs(dict(), S=40)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v), rtol=0, atol=0)


def test_torch_compile_packed_breaks_the_graph_but_runs(monkeypatch):
    """Packed documents: the checks and the lists read cu_seqlens' values (int(...)), a graph
    break; not fullgraph, but equal to eager."""
    monkeypatch.setenv("PIGEON_CPU_BACKEND", "torch")
    torch._dynamo.reset()
    q, k, v, kw = _inputs(CASES["packed_causal_alibi"])

    def f(q, k, v, cu):
        return pa.attention(q, k, v, pattern=pa.Causal(), score_mod=alibi, enable_gqa=True, cu_seqlens=cu)

    explain = torch._dynamo.explain(f)(q, k, v, kw["cu_seqlens"])
    assert explain.graph_break_count >= 1
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, backend="aot_eager")(q, k, v, kw["cu_seqlens"]),
                               f(q, k, v, kw["cu_seqlens"]), rtol=0, atol=0)


def test_data_pattern_lists_are_kept_per_tensor_and_version(monkeypatch):
    """A top-k selection reused over calls builds its block lists once; an in-place change of the
    indices (a new version) or a new tensor builds them again, with the new blocks."""
    made = []
    real = api.block_lists
    monkeypatch.setattr(api, "block_lists", lambda *a, **k: made.append(1) or real(*a, **k))
    api._LISTS.clear()
    idx = torch.tensor([[[[0, 1], [1, -1]]]])                   # [B 1, H 1, 2 query blocks, k 2]
    topk = pa.TopK(idx)
    first = api._data_lists(topk, 1, 2, 128, 128, 64, 64, torch.device("cpu"))
    again = api._data_lists(topk, 1, 2, 128, 128, 64, 64, torch.device("cpu"))
    assert len(made) == 1 and all(a is b for a, b in zip(first[:3], again[:3]))
    idx[0, 0, 1, 1] = 0                                          # in place: query block 1 now keeps 0 and 1
    changed = api._data_lists(topk, 1, 2, 128, 128, 64, 64, torch.device("cpu"))
    assert len(made) == 2 and changed[1].tolist() != first[1].tolist()
    assert changed[1].tolist() == real(topk, 1, 2, 128, 128, 64, 64).col.tolist()
    api._data_lists(pa.TopK(idx.clone()), 1, 2, 128, 128, 64, 64, torch.device("cpu"))
    assert len(made) == 3
