"""The implementations ``pigeon bench attention`` times on one problem: pigeon's kernels, SDPA
(one backend per row) and FlexAttention (compiled; ``flex-eager``: the same call uncompiled, for
its semantics only).  Each is a :class:`pigeon.bench.common.FnStep`: one forward (under no_grad) or
one forward + backward with a fixed upstream gradient, on inputs made before the timed region."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import pigeon.attention as pa

from .attn_variants import DENSE, Problem
from .common import FnStep as AttnStep
from .timing import sync

__all__ = ["AttnStep", "Peer", "pigeon_step", "pigeon_runs", "peers_for", "PEER_KINDS"]

PEER_KINDS = ("sdpa", "flex", "flex-eager")
MODES = ("forward", "forward+backward")


@dataclass
class Peer:
    name: str
    kind: str
    make: Callable[[], AttnStep] | None = None     # inside measure(): its time is first_call_s
    prepare: Callable[[], dict] | None = None      # before measure(), timed on its own (Flex's block mask)
    na: str | None = None
    note: str | None = None
    backend: str | None = None


def pigeon_runs(device, p: Problem | None = None) -> str:
    """Where pigeon's backend="kernels" runs (pigeon/attention/api.py); with a problem, which
    kernels its forward and backward take on CUDA (tensor-core "mma" or "simt", and why not mma)."""
    if device.type == "cuda":
        if p is None:
            return "cuda: pigeon's attention kernels (tensor-core where the instance allows, else SIMT)"
        return "cuda: " + kernels_of(p)
    if os.environ.get("PIGEON_CPU_BACKEND", "torch") == "emulate":
        return "cpu: the kernels' CUDA text emulated (PIGEON_CPU_BACKEND=emulate)"
    return "cpu: the reference semantics (no kernels run on a CPU; set PIGEON_CPU_BACKEND=emulate to emulate them)"


def pigeon_step(p: Problem, mode: str, grad_out) -> AttnStep:
    kw = p.pigeon_kwargs()
    return AttnStep(lambda q, k, v: pa.attention(q, k, v, backend="kernels", **kw), (p.q, p.k, p.v), mode, grad_out)


# ------------------------------------------------------------------------------ layouts of the peers

def _peer_layout(p: Problem, expand_kv: bool):
    """(q, k, v, to_pigeon, grad layout) for a peer taking [B, H, S, D]: packed documents become one
    sequence [1, H, B*S, D]; ``expand_kv`` repeats K/V to the query heads (GQA without enable_gqa),
    whose gradients sum back over the group."""
    q, k, v = p.q, p.k, p.v
    if p.packed:
        q, k, v = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))
    g = p.group
    if expand_kv and g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)

    def to_pigeon(t, which):
        if expand_kv and g > 1 and which in "kv":
            B, H, S, D = t.shape
            t = t.reshape(B, H // g, g, S, D).sum(2)
        return t[0].transpose(0, 1) if p.packed else t

    def grad_layout(t):
        return None if t is None else (t.transpose(0, 1).unsqueeze(0).contiguous() if p.packed else t)
    return q, k, v, to_pigeon, grad_layout


# ------------------------------------------------------------------------------ SDPA

def _sdpa_backends(p: Problem, device) -> list[tuple[str, object]]:
    from torch.nn.attention import SDPBackend
    if device.type != "cuda":
        return [("cpu", None)]
    if p.variant in DENSE:
        return [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    return [("efficient", SDPBackend.EFFICIENT_ATTENTION)]      # the backend that takes a dense attn_mask


def sdpa_peers(p: Problem, mode: str, grad_out, device) -> list[Peer]:
    if p.variant == "softcap":
        return [Peer("sdpa", "sdpa", na="SDPA cannot modify the scores after q k^T (soft-capping needs a score_mod)")]
    from torch.nn.attention import sdpa_kernel
    masked = p.variant not in DENSE
    out = []
    for label, backend in _sdpa_backends(p, device):
        def make(backend=backend):
            q, k, v, to_pigeon, gl = _peer_layout(p, expand_kv=True)
            mask = p.sdpa_bias(q.dtype)      # additive: SDPA would convert a bool mask on every call
            causal = p.variant == "causal"

            def fn(q, k, v):
                if backend is None:
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            return AttnStep(fn, (q, k, v), mode, gl(grad_out), to_pigeon)
        note = "is_causal=True" if p.variant == "causal" else None
        if masked:
            note = ("a dense additive attn_mask in q's dtype (0 kept, -inf masked"
                    + ("; the ALiBi bias where kept" if p.variant == "alibi" else "") + "), built outside the timed region")
            if p.group > 1:
                note += "; K/V expanded to the query heads outside the timed region"
        if label == "cpu":
            note = ((note + "; ") if note else "") + "torch's own backend choice on a CPU"
        out.append(Peer(f"sdpa:{label}" + ("+mask" if masked else ""), "sdpa", make=make, note=note, backend=label))
    return out


# ------------------------------------------------------------------------------ FlexAttention

def flex_peer(p: Problem, mode: str, grad_out, device, compiled: bool = True) -> Peer:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    score_mod, mask_mod, Bm, Hm = p.flex_mods()
    state = {}
    T = p.q.shape[0] if p.packed else p.S

    def prepare() -> dict:
        if mask_mod is None:
            return {"block_mask": "none (no mask)"}
        kw = dict(device=device, _compile=device.type == "cuda")
        t0 = time.perf_counter()
        create_block_mask(mask_mod, Bm, Hm, T, T, **kw)
        sync(device)
        t1 = time.perf_counter()
        state["bm"] = create_block_mask(mask_mod, Bm, Hm, T, T, **kw)
        sync(device)
        return {"block_mask_first_s": t1 - t0, "block_mask_s": time.perf_counter() - t1,
                "block_mask": f"create_block_mask(B={Bm}, H={Hm}, {T}x{T}, BLOCK_SIZE=128"
                              + (", _compile=True)" if kw["_compile"] else ")")}

    def make():
        fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
        bm = state.get("bm")
        q, k, v, to_pigeon, gl = _peer_layout(p, expand_kv=False)
        gqa = p.group > 1
        return AttnStep(lambda q, k, v: fn(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=gqa),
                        (q, k, v), mode, gl(grad_out), to_pigeon)
    note = ("torch.compile(flex_attention, dynamic=False); compile_s = its first call (compile + one run); "
            "the block mask is built before it, timed apart (block_mask_first_s: the first build, "
            "block_mask_s: a second one)") if compiled else "flex_attention uncompiled (its unfused form): semantics only"
    return Peer("flex" if compiled else "flex-eager", "compile" if compiled else "flex-eager", make=make,
                prepare=prepare, note=note)


CPU_FLEX = ("compiled FlexAttention on a CPU builds C++ for each variant and mode (~13 s); "
            "--peers flex times it anyway, flex-eager checks its semantics")


def peers_for(p: Problem, mode: str, grad_out, device, peers: tuple[str, ...], explicit: bool) -> list[Peer]:
    """The peer rows of a case: ``peers`` as chosen; without an explicit --peers, compiled Flex on a
    CPU is listed as n/a (why: CPU_FLEX)."""
    out = []
    if "sdpa" in peers:
        out += sdpa_peers(p, mode, grad_out, device)
    if "flex" in peers:
        if device.type != "cuda" and not explicit:
            out.append(Peer("flex", "compile", na=CPU_FLEX))
        else:
            out.append(flex_peer(p, mode, grad_out, device, compiled=True))
    if "flex-eager" in peers:
        if mode != "forward":
            out.append(Peer("flex-eager", "flex-eager", na="flex_attention's uncompiled form has no backward"))
        else:
            out.append(flex_peer(p, mode, grad_out, device, compiled=False))
    return out


def kernels_of(p: Problem) -> str:
    """"forward mma [schedule], backward simt (why)": the kernels pigeon's attention picks for ``p``."""
    from ..attention.api import kernels_used
    kw = p.pigeon_kwargs()
    used = kernels_used(p.q, p.k, p.v, score_mod=kw.get("score_mod"), pattern=kw.get("pattern"),
                        cu_seqlens=kw.get("cu_seqlens"))
    why = used["why_not_mma"]
    sched = {"forward": f" [{used['forward_schedule']}]"} if "forward_schedule" in used else {}
    return ", ".join(f"{w} {used[w]}" + sched.get(w, "") + (f" ({why[w]})" if w in why else "")
                     for w in ("forward", "backward"))
