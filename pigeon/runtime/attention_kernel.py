"""Running the attention kernels (pigeon/codegen/attention.py, attention_mma.py,
attention_mma_bwd.py): build (disk cache) and launch on torch's current stream, or run the same
CUDA text emulated on a CPU.

Which template runs (:func:`kernel_variant`): the tensor-core forward and backward ("mma") where
they apply (bfloat16/float16, head dim 64 or 128, 64x64 pattern blocks, on a GPU), else the SIMT
ones, which serve every instance and are the ones a CPU emulates.  ``PIGEON_ATTENTION_KERNEL=simt`` forces the
SIMT kernels (A/B runs); ``=mma`` makes an instance the tensor-core template cannot take an error
instead of a quiet SIMT run.  The tensor-core forward's schedule (64- or 128-row query tiles, ...)
is pigeon/codegen/attention_mma.py ``tuning`` (per head dim, ``PIGEON_ATTN_MMA_TUNE``); every
schedule takes the pattern's 64x64 lists, so the launcher binds them all the same way.
``PIGEON_ATTN_FORWARD=auto`` (default; ``wgmma`` forces it, ``mma`` turns it off) runs the tensor-core forward on the Hopper wgmma
template instead (pigeon/codegen/attention_wgmma.py, built for sm_90a; an error on other archs)."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch

from ..codegen.attention import AttentionCodegenError, AttentionInstance, render_attention, render_attention_backward
from ..codegen import attention_mma, attention_mma_bwd, attention_sm90, attention_wgmma

_MODULES: dict = {}      # (kernel name, device) -> loaded module
VARIANTS = ("auto", "simt", "mma")


def kernel_variant(inst: AttentionInstance, emulate: bool, backward: bool = False) -> str:
    """"mma" (tensor cores) or "simt" for ``inst``'s forward (``backward=False``) or backward kernel."""
    want = os.environ.get("PIGEON_ATTENTION_KERNEL", "auto")
    if want not in VARIANTS:
        raise AttentionCodegenError(f"PIGEON_ATTENTION_KERNEL={want!r}: expected one of {VARIANTS}")
    if want == "simt":
        return "simt"
    why = (attention_mma_bwd if backward else attention_mma).unsupported(inst)
    if emulate:
        why = "a CPU emulates only the SIMT kernels"
    if why is None:
        return "mma"
    if want == "mma":
        raise AttentionCodegenError(f"PIGEON_ATTENTION_KERNEL=mma, but this attention {'backward' if backward else 'forward'} "
                                    f"cannot use tensor cores: {why}")
    return "simt"


def _render(inst: AttentionInstance, variant: str, backward: bool, arch: str | None = None):
    # "cutlass" reaches here for a call its library cannot take (run_attention_kernel): the wgmma kernel runs it
    if variant == "mma" and not backward and attention_wgmma.forward_template(inst, arch) in ("wgmma", "cutlass"):
        return attention_wgmma.render_attention_wgmma(inst)
    if variant == "mma":
        return (attention_mma_bwd.render_attention_mma_backward if backward else attention_mma.render_attention_mma)(inst)
    return (render_attention_backward if backward else render_attention)(inst)


def _module(inst: AttentionInstance, device: torch.device, emulate: bool, backward: bool = False):
    variant = kernel_variant(inst, emulate, backward)
    arch = None
    if not emulate:
        from .build import device_arch
        arch = device_arch(device)
    rk = _render(inst, variant, backward, arch)
    key = (rk.name, str(device), emulate)
    mod = _MODULES.get(key)
    if mod is None:
        if emulate:
            from .emulate import EmulatedModule
            mod = EmulatedModule(rk)
        else:
            from .build import build_kernel
            from .launch import load_module
            # a kernel that needs the arch-specific target (the wgmma forward: sm_90a) names it in its meta
            mod = load_module(build_kernel(rk.source, rk.meta.get("arch") or arch, name=rk.name), device)
        _MODULES[key] = mod
    return rk, mod


def run_attention_kernel(inst: AttentionInstance, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         lists: Any, scale: float, cu_seqlens: torch.Tensor | None = None,
                         emulate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of ``inst`` on checked inputs: dense ``[B, H, S, D]`` or packed ``[T, H, D]``;
    ``lists`` the pattern's BlockLists for (q_len, kv_len) (packed: the longest document)."""
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = _lse_like(inst, q)
    if os.environ.get("PIGEON_POISON", "") == "1":      # every output element must be written
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    if kernel_variant(inst, emulate) == "mma":      # 16-byte vector loads and stores
        q, k, v = (_aligned16(t) for t in (q, k, v))
        if _runs_cutlass(inst, q, k):
            from .attention_sm90 import run_sm90_forward
            return run_sm90_forward(inst, q, k, v, scale, lists)
    sizes, strides, arrays = _layout(inst, q, k, v, out, lse, lists, cu_seqlens)
    tensors = {"O": out, "LSE": lse, "Q": q, "K": k, "V": v}
    _launch(inst, q.device, emulate, False, tensors, sizes, strides, arrays, scale)
    return out, lse


def _runs_cutlass(inst: AttentionInstance, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether this forward call runs CUTLASS's FMHA library (pigeon/codegen/attention_sm90.py): the
    instance's forward template is "cutlass" and the call's sizes fit it."""
    if q.device.type != "cuda" or inst.packed:
        return False
    from .build import device_arch
    if attention_wgmma.forward_template(inst, device_arch(q.device)) != "cutlass":
        return False
    return attention_sm90.call_unsupported(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3],
                                           inst.group) is None


def _runs_cutlass_backward(inst: AttentionInstance, q: torch.Tensor, k: torch.Tensor, scale: float) -> bool:
    """Whether this backward call runs CUTLASS's FMHA backward library (pigeon/codegen/attention_sm90.py)."""
    if q.device.type != "cuda" or inst.packed:
        return False
    from .build import device_arch
    if attention_sm90.backward_template(inst, device_arch(q.device)) != "cutlass":
        return False
    return attention_sm90.backward_call_unsupported(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3],
                                                    scale) is None


def run_attention_backward(inst: AttentionInstance, q, k, v, out, lse, grad_out, lists: Any, scale: float,
                           cu_seqlens: torch.Tensor | None = None, emulate: bool = False):
    """(dq, dk, dv) of ``inst``: q, k, v, out contiguous as the forward had them; returned in the
    inputs' dtype.  SIMT: dk and dv summed in float32 buffers.  Tensor cores: Di = rowsum(dO * O)
    in float32 here, the lists transposed (per key block), dk and dv written by the kernel, dq
    summed in a float32 buffer."""
    if kernel_variant(inst, emulate, backward=True) == "mma":
        if _runs_cutlass_backward(inst, q, k, scale):
            from .attention_sm90 import run_sm90_backward
            q, k, v, out = (_aligned16(t) for t in (q, k, v, out))
            return run_sm90_backward(inst, q, k, v, out, lse, _aligned16(grad_out.contiguous()))
        return _run_mma_backward(inst, q, k, v, out, lse, grad_out, lists, scale, cu_seqlens)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    if os.environ.get("PIGEON_POISON", "") == "1":
        dq.fill_(float("nan"))
    sizes, strides, arrays = _layout(inst, q, k, v, out, lse, lists, cu_seqlens)
    tensors = {"dQ": dq, "dK": dk, "dV": dv, "Q": q, "K": k, "V": v, "O": out,
               "dO": grad_out.contiguous(), "LSE": lse}
    _launch(inst, q.device, emulate, True, tensors, sizes, strides, arrays, scale)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _run_mma_backward(inst, q, k, v, out, lse, grad_out, lists, scale, cu_seqlens):
    q, k, v, out = (_aligned16(t) for t in (q, k, v, out))
    g = _aligned16(grad_out.contiguous())
    di = (g.float() * out.float()).sum(-1)                      # [B, H, S] or packed [T, H]
    di = (di.t() if inst.packed else di).contiguous()           # laid out as lse
    assert di.shape == lse.shape and di.stride() == lse.stride(), (di.shape, lse.shape)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if os.environ.get("PIGEON_POISON", "") == "1":              # the kernel writes every dk, dv element
        dk.fill_(float("nan"))
        dv.fill_(float("nan"))
    sizes, strides, arrays = _layout(inst, q, k, v, out, lse, lists, cu_seqlens)
    nk = -(-int(sizes["seq_kv"]) // attention_mma_bwd.BLOCK_N)
    sizes["list_kblocks"] = nk
    arrays.update(zip(("tptr", "trow", "tfull"), _transposed(lists, nk, q.device)))
    if arrays["trow"].numel() == 0:
        arrays["trow"] = arrays["tfull"] = torch.zeros(1, dtype=torch.int32, device=q.device)
    tensors = {"dQ": dq, "dK": dk, "dV": dv, "Q": q, "K": k, "V": v, "dO": g, "LSE": lse, "Di": di}
    _launch(inst, q.device, False, True, tensors, sizes, strides, arrays, scale)
    if sizes["max_q"] == 0:                                     # no query: nothing launched, no gradient
        dk.zero_()
        dv.zero_()
    return dq.to(q.dtype), dk, dv


# The backward's key-major lists (a sort and a search per call, ~8 torch ops) of the same list
# tensors: kept per (their identities and versions, nk); the entry holds the source tensors, so an
# identity is not reused while it lives, and an in-place change bumps a version.  An eager attention
# call passes the same list tensors for a call shape (pigeon/attention/api.py caches them).
MAX_TRANSPOSED = 16
_TRANSPOSED: "OrderedDict[tuple, tuple]" = OrderedDict()


def _transposed(lists: Any, nk: int, device) -> tuple:
    src = (lists.ptr, lists.col, lists.full)
    key = tuple((id(t), t._version) for t in src) + (nk, str(device))
    got = _TRANSPOSED.get(key)
    if got is not None and all(a is b for a, b in zip(got[0], src)):
        _TRANSPOSED.move_to_end(key)
        return got[1]
    t = lists.transposed(nk)
    arrays = tuple(x.to(device=device, dtype=torch.int32) for x in (t.ptr, t.col, t.full))
    if not torch.compiler.is_compiling():
        _TRANSPOSED[key] = (src, arrays)
        while len(_TRANSPOSED) > MAX_TRANSPOSED:
            _TRANSPOSED.popitem(last=False)
    return arrays


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    """``t`` (contiguous) with a 16-byte aligned start: a copy only for an oddly offset view."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _lse_like(inst: AttentionInstance, q: torch.Tensor) -> torch.Tensor:
    if inst.packed:
        return torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    return torch.empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32, device=q.device)


_UNUSED_CU: dict = {}


def _unused_cu(dev) -> torch.Tensor:
    """A valid int32 pointer for the dense kernels' cu_seqlens parameter (never read): one per device."""
    t = _UNUSED_CU.get(dev)
    if t is None:
        t = _UNUSED_CU[dev] = torch.zeros(1, dtype=torch.int32, device=dev)
    return t


def _layout(inst, q, k, v, out, lse, lists, cu_seqlens):
    dev = q.device
    if inst.packed:
        H = q.shape[1]
        docs = cu_seqlens.numel() - 1
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        max_q = int(lens.max()) if docs else 0
        sizes = {"batch": docs, "heads": H, "max_q": max_q, "seq_kv": max_q}
        strides = {n: (0, t.stride(0), t.stride(1)) for n, t in (("q", q), ("k", k), ("v", v), ("o", out))}
        strides["lse"] = (0, lse.stride(0))
        cu = cu_seqlens.to(device=dev, dtype=torch.int32).contiguous()
    else:
        B, H, Sq = q.shape[0], q.shape[1], q.shape[2]
        sizes = {"batch": B, "heads": H, "max_q": Sq, "seq_kv": k.shape[2]}
        strides = {n: (t.stride(0), t.stride(2), t.stride(1)) for n, t in (("q", q), ("k", k), ("v", v), ("o", out))}
        strides["lse"] = (lse.stride(0), lse.stride(1))
        cu = _unused_cu(dev)                                    # unused by the dense kernel
    LB, LH, nq = lists.shape
    sizes.update(list_batch=LB, list_heads=LH, list_qblocks=nq)
    arrays = {"ptr": lists.ptr.to(device=dev, dtype=torch.int32), "col": lists.col.to(device=dev, dtype=torch.int32),
              "full": lists.full.to(device=dev, dtype=torch.int32), "cu_seqlens": cu}
    if arrays["col"].numel() == 0:                              # no block at all: a valid, empty pointer
        arrays["col"] = arrays["full"] = torch.zeros(1, dtype=torch.int32, device=dev)
    return sizes, strides, arrays


_BINDINGS: dict = {}      # kernel name -> ((kind, key, axis), ...): each parameter's source, read once


def _binding(rk) -> tuple:
    """How each parameter of ``rk`` is bound (its role parsed once per kernel, not per launch: the
    string work was a measurable part of a call's host time on the H200's host)."""
    plan = _BINDINGS.get(rk.name)
    if plan is None:
        out = []
        for p in rk.params:
            kind, what = p.role.split(":", 1)
            if kind in ("out", "in"):
                out.append(("tensor", what, None))
            elif kind in ("lists", "size", "scale"):
                out.append((kind, what, None))
            elif kind == "stride":
                t, axis = what.split("_")
                out.append(("stride", t, ("bh" if t == "lse" else "brh").index(axis)))
            else:  # pragma: no cover
                raise ValueError(f"{rk.name}: unknown parameter role {p.role!r}")
        plan = _BINDINGS[rk.name] = (tuple(out), tuple(rk.ctypes))
    return plan


def _launch(inst, dev, emulate, backward, tensors, sizes, strides, arrays, scale) -> None:
    rk, mod = _module(inst, dev, emulate, backward)
    plan, types = _binding(rk)
    args = []
    for kind, what, axis in plan:
        if kind == "tensor":
            args.append(tensors[what])
        elif kind == "lists":
            args.append(arrays[what])
        elif kind == "size":
            args.append(int(sizes[what]))
        elif kind == "stride":
            args.append(int(strides[what][axis]))
        else:
            args.append(float(scale))
    if sizes["batch"] * sizes["heads"] * sizes["max_q"] > 0:
        mod.function(rk.name).launch(rk.grid(sizes), rk.block, args, types, shared_mem=rk.shared_mem)
