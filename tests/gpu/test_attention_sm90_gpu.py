"""The CUTLASS sm90 attention forward (PIGEON_ATTN_FORWARD=auto on an sm_90 GPU: dense and causal
by formula, sliding windows, S2, top-k and block lists over their tile lists, GQA folded; with and
without traced modifiers) against the float64 reference (bf16 tolerance), NaN-poisoned
outputs, lengths off the tiles (key tails, q_len != kv_len, causal rows with no key), head dims 64
and 128, bf16 and fp16; each test checks that CUTLASS's library ran (and, for a call it cannot take,
that the wgmma kernel did); pigeon's mma backward on the CUTLASS forward's lse (a scale CUTLASS's
backward does not take), and CUTLASS's backward with pigeon's mask fusion (the default scale).
The module first builds every library it needs in parallel (~1 minute of nvcc each)."""
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import pigeon.attention as pa
import pigeon.runtime.attention_kernel as ak
import pigeon.runtime.attention_sm90 as rs9
from pigeon.attention.api import kernels_used

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_attention_kernel import _rel_err  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")

CASES = {
    "dense": dict(),
    "causal": dict(pattern=pa.Causal()),
    "alibi_causal": dict(score_mod=lambda s, b, h, q, kv: s + pa.exp((h + 1) * -0.5) * (kv - q), pattern=pa.Causal()),
    "softcap": dict(score_mod=lambda s, b, h, q, kv: 30.0 * pa.tanh(s / 30.0)),
    "mask_mod": dict(mask_mod=lambda b, h, q, kv: ((kv % 3 != 1) | (q < kv)) & ((q + b) % 17 != 5)),
}
# (q_len, kv_len): key tails (333), more queries than keys (causal rows with no key), one key tile
SHAPES = [(256, 333), (320, 200), (64, 64)]
MAIN = ([(n, d, torch.bfloat16) for n in CASES for d in (64, 128)]
        + [(n, d, torch.float16) for n in ("dense", "causal") for d in (64, 128)] + [("softcap", 128, torch.float16)])
SCALE = 0.09


def _topk(B, H, Sq, Skv, block=64, gen=None, k=3):
    """Random selections per (batch, selection head, query block), with repeats and -1 (none)."""
    nq, nk = -(-Sq // block), -(-Skv // block)
    return pa.TopK(torch.randint(-1, nk, (B, H, nq, k), generator=gen), block_m=block, block_n=block)


def _block_list(H, Sq, Skv, gen=None):
    """Per-head BCSR on 64 x 64 blocks: about half the blocks, row 0 of head 0 empty."""
    nq, nk = -(-Sq // 64), -(-Skv // 64)
    keep = torch.rand(H, nq, nk, generator=gen) < 0.5
    keep[0, 0] = False
    crow = torch.zeros(H, nq + 1, dtype=torch.int64)
    crow[:, 1:] = keep.sum(-1).cumsum(-1)
    return pa.BlockList(crow, keep.nonzero()[:, 2].contiguous())


# pattern factories of (batch, query heads, KV heads, q_len, kv_len, generator): the listed iteration
LISTED = {
    "window": lambda B, H, Hk, Sq, Skv, g: dict(pattern=pa.SlidingWindow(100)),
    "window_bidir": lambda B, H, Hk, Sq, Skv, g: dict(pattern=pa.SlidingWindow(70, causal=False)),
    "window_alibi": lambda B, H, Hk, Sq, Skv, g: dict(pattern=pa.SlidingWindow(150),
                                                      score_mod=lambda s, b, h, q, kv: s + 0.1 * (h + 1) * (kv - q) / 64),
    "window_mask_mod": lambda B, H, Hk, Sq, Skv, g: dict(pattern=pa.SlidingWindow(200),
                                                         mask_mod=lambda b, h, q, kv: (kv % 5 != 2) | (q == kv)),
    "s2": lambda B, H, Hk, Sq, Skv, g: dict(pattern=pa.S2(4, 1, block=64)),
    "topk": lambda B, H, Hk, Sq, Skv, g: dict(pattern=_topk(B, H, Sq, Skv, gen=g)),
    "topk_gqa": lambda B, H, Hk, Sq, Skv, g: dict(pattern=_topk(B, Hk, Sq, Skv, block=128, gen=g)),
    "block_list": lambda B, H, Hk, Sq, Skv, g: dict(pattern=_block_list(H, Sq, Skv, gen=g)),
    "gqa_causal": lambda B, H, Hk, Sq, Skv, g: dict(pattern=pa.Causal()),
    "gqa_dense_softcap": lambda B, H, Hk, Sq, Skv, g: dict(score_mod=lambda s, b, h, q, kv: 30.0 * pa.tanh(s / 30.0)),
}
# (case, head dim, dtype, KV heads of 4 query heads, schedule knobs); S2 needs q_len == kv_len, GQA
# q_len % 128 == 0
LISTED_MAIN = [("window", 128, torch.bfloat16, 4, ""), ("window", 64, torch.bfloat16, 4, ""),
               ("window", 128, torch.bfloat16, 4, "bn64"), ("window_bidir", 128, torch.float16, 4, ""),
               ("window_alibi", 128, torch.bfloat16, 4, ""), ("window_mask_mod", 128, torch.bfloat16, 2, ""),
               ("s2", 128, torch.bfloat16, 4, ""), ("s2", 64, torch.bfloat16, 4, "bn64"),
               ("topk", 128, torch.bfloat16, 4, ""), ("topk_gqa", 128, torch.bfloat16, 2, ""),
               ("block_list", 64, torch.bfloat16, 4, ""), ("gqa_causal", 128, torch.bfloat16, 1, ""),
               ("gqa_dense_softcap", 64, torch.float16, 2, "")]
LISTED_SHAPES = {"s2": [(1024, 1024), (384, 384), (2048, 2048)]}
GQA_SHAPES = [(256, 333), (384, 200), (128, 128)]
MHA_SHAPES = [(256, 333), (320, 200), (64, 64), (448, 448)]


def _listed_shapes(name, hkv):
    return LISTED_SHAPES.get(name) or (GQA_SHAPES if hkv != 4 else MHA_SHAPES)


def specs():
    """The libraries this module runs (scripts/prebuild_kernels.py --attention-sm90 builds them ahead)."""
    from pigeon.attention.api import _plan
    out = {}
    for name, d, dtype in MAIN:
        kw = CASES[name]
        smod = pa.trace_score_mod(kw["score_mod"]) if "score_mod" in kw else None
        mmod = pa.trace_mask_mod(kw["mask_mod"]) if "mask_mod" in kw else None
        q = torch.empty(1, 4, 64, d, dtype=dtype)
        spec = rs9.attention_sm90.spec_for(_plan(q, q, q, smod, mmod, kw.get("pattern"), None)[0], SCALE, "")
        out[spec.name] = spec        # the long-sequence test's (default scale, no score_mod) are among these
    for name, d, dtype, hkv, tune in LISTED_MAIN:
        for Sq, Skv in _listed_shapes(name, hkv):        # the key tile may depend on the shape (block_n_for)
            kw = LISTED[name](2, 4, hkv, Sq, Skv, torch.Generator().manual_seed(0))
            smod = pa.trace_score_mod(kw["score_mod"]) if "score_mod" in kw else None
            mmod = pa.trace_mask_mod(kw["mask_mod"]) if "mask_mod" in kw else None
            q = torch.empty(2, 4, Sq, d, dtype=dtype)
            k = torch.empty(2, hkv, Skv, d, dtype=dtype)
            inst, lists, _ = _plan(q, k, k, smod, mmod, kw.get("pattern"), None)
            bn = rs9.block_n_for(inst, lists, Sq, Skv, tune)
            spec = rs9.attention_sm90.spec_for(inst, SCALE, f"{tune},bn{bn}")
            out[spec.name] = spec
    return list(out.values())


@pytest.fixture(scope="module", autouse=True)
def _prebuild():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return
    if os.environ.get("PIGEON_SM90_TEST_PREBUILD", "1") == "0":     # a -k subset: each test builds its own
        return
    import fcntl
    from pigeon.runtime.cache import default_cache_root
    from pigeon.runtime.hostlib import build_library
    lock = default_cache_root() / "sm90_attention_gpu_tests.prebuild.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:          # one xdist worker builds, the others then read the cache
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            todo = specs() + backward_specs()
            build = lambda s: build_library(rs9.attention_sm90.render_attention_sm90(s), "sm_90a", name=s.name)  # noqa: E731
            with ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1))) as ex:
                list(ex.map(lambda s: _quiet(build, s), todo))
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _quiet(fn, *a):
    try:
        fn(*a)
    except Exception:         # noqa: BLE001 - the test that needs the library reports the failure
        pass


@pytest.fixture(autouse=True)
def _sm90(monkeypatch):
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the CUTLASS sm90 forward needs an sm_90 GPU")
    monkeypatch.setenv("PIGEON_POISON", "1")
    monkeypatch.setenv("PIGEON_ATTENTION_KERNEL", "mma")
    monkeypatch.delenv("PIGEON_ATTN_FORWARD", raising=False)
    monkeypatch.delenv("PIGEON_ATTN_SM90_TUNE", raising=False)


def _check(out, lse, ref, ref_lse, what):
    assert not torch.isnan(out).any(), f"{what}: an output element was not written"
    assert not torch.isnan(lse).any(), f"{what}: an lse element was not written"
    assert _rel_err(out, ref) < 2e-2, f"{what}: {_rel_err(out, ref):.3e}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), what
    assert (lse[~finite] == -float("inf")).all(), f"{what}: a row with no kept key must have lse -inf"
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-3, atol=1e-3)
    assert (out[~finite] == 0).all(), f"{what}: a row with no kept key must be zero"


def _count_runs(monkeypatch):
    calls = []
    real = rs9.run_sm90_forward

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(rs9, "run_sm90_forward", counted)
    return calls


@pytest.mark.parametrize("name,head_dim,dtype", MAIN)
def test_cutlass_forward_equals_the_reference(name, head_dim, dtype, monkeypatch):
    calls = _count_runs(monkeypatch)
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    kw = CASES[name]
    for Sq, Skv in SHAPES:
        q = torch.randn(2, 4, Sq, head_dim, generator=g).to(DEV, dtype)
        k = torch.randn(2, 4, Skv, head_dim, generator=g).to(DEV, dtype)
        v = torch.randn(2, 4, Skv, head_dim, generator=g).to(DEV, dtype)
        assert kernels_used(q, k, v, **kw)["forward"] == "cutlass"
        out, lse = pa.attention(q, k, v, scale=SCALE, return_lse=True, **kw)
        ref, ref_lse = pa.attention(q.double(), k.double(), v.double(), scale=SCALE, return_lse=True,
                                    backend="reference", **kw)
        _check(out, lse, ref, ref_lse, f"{name} d{head_dim} {dtype} {Sq}x{Skv} seed {seed}")
    assert len(calls) == len(SHAPES)


@pytest.mark.parametrize("name,head_dim,dtype,hkv,tune", LISTED_MAIN)
def test_cutlass_listed_and_gqa_forward_equals_the_reference(name, head_dim, dtype, hkv, tune, monkeypatch):
    """Patterns over their tile lists (partial and full list blocks, rows with no block, key tails,
    the nfull leading tiles unmasked) and GQA folded into the rows, against the float64 reference."""
    calls = _count_runs(monkeypatch)
    if tune:
        monkeypatch.setenv("PIGEON_ATTN_SM90_TUNE", tune)
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    shapes = _listed_shapes(name, hkv)
    for Sq, Skv in shapes:
        q = torch.randn(2, 4, Sq, head_dim, generator=g).to(DEV, dtype)
        k = torch.randn(2, hkv, Skv, head_dim, generator=g).to(DEV, dtype)
        v = torch.randn(2, hkv, Skv, head_dim, generator=g).to(DEV, dtype)
        kw = LISTED[name](2, 4, hkv, Sq, Skv, g)
        used = kernels_used(q, k, v, **kw)
        assert used["forward"] == "cutlass", used
        out, lse = pa.attention(q, k, v, scale=SCALE, return_lse=True, enable_gqa=hkv != 4, **kw)
        ref, ref_lse = pa.attention(q.double(), k.double(), v.double(), scale=SCALE, return_lse=True,
                                    enable_gqa=hkv != 4, backend="reference", **kw)
        _check(out, lse, ref, ref_lse, f"{name} d{head_dim} {dtype} hkv {hkv} {tune} {Sq}x{Skv} seed {seed}")
    assert len(calls) == len(shapes)


def test_closed_form_tile_lists_are_made_once_per_shape(monkeypatch):
    """A window's tile lists come from api.py's cached block lists: made on the first call only (for
    both key tiles: block_n_for compares their areas)."""
    import pigeon.runtime.attention_tiles as tl
    made = []
    real = tl.tile_lists
    monkeypatch.setattr(tl, "tile_lists", lambda *a, **k: made.append(1) or real(*a, **k))
    rs9._TILES.clear()
    q, k, v = (torch.randn(1, 4, 256, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    outs = [pa.attention(q, k, v, pattern=pa.SlidingWindow(100), scale=SCALE) for _ in range(3)]
    assert len(made) == 2 and all(torch.equal(outs[0], o) for o in outs[1:])


def test_gqa_off_the_128_row_grid_runs_the_wgmma_kernel(monkeypatch):
    calls = _count_runs(monkeypatch)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 200, 128, generator=g).to(DEV, torch.bfloat16)
    k, v = (torch.randn(1, 1, 200, 128, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    used = kernels_used(q, k, v, pattern=pa.Causal())
    assert used["forward"] == "wgmma" and "not a multiple of 128" in used["why_not_cutlass"]
    out = pa.attention(q, k, v, pattern=pa.Causal(), enable_gqa=True)
    ref = pa.attention(q.double(), k.double(), v.double(), pattern=pa.Causal(), enable_gqa=True, backend="reference")
    assert not calls and _rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("head_dim", [64, 128])
def test_cutlass_forward_long_sequence_default_scale(head_dim, monkeypatch):
    """4096 keys (32-64 tiles: the K/V pipeline wraps many times), scores of a large scale (online-softmax rescales)."""
    calls = _count_runs(monkeypatch)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 4096, head_dim, generator=g).to(DEV, torch.bfloat16) for _ in range(3))
    q3 = q * 3
    cases = [dict(), dict(pattern=pa.Causal()), dict(pattern=pa.SlidingWindow(100))]
    for kw in cases:
        out, lse = pa.attention(q3, k, v, return_lse=True, **kw)
        ref, ref_lse = pa.attention(q3.double(), k.double(), v.double(), return_lse=True, backend="reference", **kw)
        _check(out, lse, ref, ref_lse, f"long d{head_dim} {kw}")
    if head_dim == 128:         # top-k shared by a KV group of 2 (the bench's topk-g2 library)
        kw = dict(pattern=_topk(1, 1, 4096, 4096, block=128, gen=g, k=8), enable_gqa=True)
        out, lse = pa.attention(q3, k[:, :1], v[:, :1], return_lse=True, **kw)
        ref, ref_lse = pa.attention(q3.double(), k[:, :1].double(), v[:, :1].double(), return_lse=True,
                                    backend="reference", **kw)
        _check(out, lse, ref, ref_lse, "long d128 top-k GQA 2")
    assert len(calls) == len(cases) + (head_dim == 128)


def test_a_call_off_the_8_row_grid_runs_the_wgmma_kernel(monkeypatch):
    calls = _count_runs(monkeypatch)
    ak._MODULES.clear()
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 300, 128, generator=g).to(DEV, torch.bfloat16) for _ in range(3))
    assert kernels_used(q, k, v, pattern=pa.Causal())["forward"] == "wgmma"
    out = pa.attention(q, k, v, pattern=pa.Causal())
    ref = pa.attention(q.double(), k.double(), v.double(), pattern=pa.Causal(), backend="reference")
    assert not calls and any("_wgmma_" in name for name, *_ in ak._MODULES)
    assert _rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("name", ["causal", "alibi_causal", "mask_mod"])
def test_backward_on_the_cutlass_forward(name, monkeypatch):
    """pigeon's mma backward reads the CUTLASS forward's out and lse (natural log, -inf for empty rows)."""
    calls = _count_runs(monkeypatch)
    g = torch.Generator().manual_seed(11)
    kw = CASES[name]
    q, k, v = (torch.randn(1, 4, S, 128, generator=g).to(DEV, torch.bfloat16).requires_grad_()
               for S in (320, 256, 256))
    out = pa.attention(q, k, v, scale=SCALE, **kw)
    dout = torch.randn(out.shape, generator=g).to(DEV, torch.bfloat16)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = pa.attention(qd, kd, vd, scale=SCALE, backend="reference", **kw)
    rq, rk, rv = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
    assert calls, "the CUTLASS forward did not run"
    for got, want, what in ((dq, rq, "dq"), (dk, rk, "dk"), (dv, rv, "dv")):
        assert not torch.isnan(got).any(), what
        assert _rel_err(got, want) < 3e-2, f"{name} {what}: {_rel_err(got, want):.3e}"


BACKWARD = [(n, d, torch.float16) for n in ("dense", "causal", "mask_mod") for d in (64, 128)]


def backward_specs():
    """The backward libraries of test_cutlass_backward_equals_the_reference (prebuilt ahead by
    scripts/prebuild_kernels.py --attention-sm90 tests)."""
    from pigeon.attention.api import _plan
    out = {}
    for name, d, dtype in BACKWARD:
        kw = CASES[name]
        mmod = pa.trace_mask_mod(kw["mask_mod"]) if "mask_mod" in kw else None
        q = torch.empty(1, 4, 64, d, dtype=dtype)
        spec = rs9.attention_sm90.backward_spec_for(_plan(q, q, q, None, mmod, kw.get("pattern"), None)[0])
        out[spec.name] = spec
    return list(out.values())


def _count_backward_runs(monkeypatch):
    calls = []
    real = rs9.run_sm90_backward

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(rs9, "run_sm90_backward", counted)
    return calls


@pytest.mark.parametrize("name,head_dim,dtype", BACKWARD)
def test_cutlass_backward_equals_the_reference(name, head_dim, dtype, monkeypatch):
    """CUTLASS's backward (the default scale 1/sqrt(D)) with pigeon's mask fusion: key tails, more
    queries than keys (rows with no key: lse +inf to CUTLASS), NaN-poisoned gradients."""
    calls = _count_backward_runs(monkeypatch)
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    kw = CASES[name]
    for Sq, Skv in SHAPES:
        q = torch.randn(2, 4, Sq, head_dim, generator=g).to(DEV, dtype).requires_grad_()
        k, v = (torch.randn(2, 4, Skv, head_dim, generator=g).to(DEV, dtype).requires_grad_() for _ in range(2))
        assert kernels_used(q, k, v, **kw)["backward"] == "cutlass"
        out = pa.attention(q, k, v, **kw)
        dout = torch.randn(out.shape, generator=g).to(DEV, dtype)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = pa.attention(qd, kd, vd, backend="reference", **kw)
        want = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
        for got, w, what in zip(grads, want, ("dq", "dk", "dv")):
            tag = f"{name} d{head_dim} {dtype} {Sq}x{Skv} {what} seed {seed}"
            assert not torch.isnan(got).any(), f"{tag}: a gradient element was not written"
            assert _rel_err(got, w) < 3e-2, f"{tag}: {_rel_err(got, w):.3e}"
    assert len(calls) == len(SHAPES)
