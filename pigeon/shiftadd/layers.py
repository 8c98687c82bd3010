"""ShiftAdd layers as torch.nn.Modules built from pigeon's ShiftAdd primitives (issue 9).

These are plain torch modules, not DSL specs: nothing here goes through ``pigeon.compile`` or the
IR.  They call the primitives of pigeon/shiftadd (quant.py, fixed.py, add.py, router.py).  On a
CPU they run the torch forms of the primitives (and, for the shift linear's integer inference
path, the TVM kernel of tvm_shift.py built for llvm).  On CUDA tensors (``backend="kernels"``, the
default) they run the generated kernels through pigeon/runtime/shiftadd_kernel.py (TVM-generated
CUDA carried in the kernel cache; a missing entry without TVM is an error, never a quiet torch
run); ``backend="torch"`` runs the torch forms on any device.  Backward on CUDA: ShiftLinear's
dx = g Wq by the same shift kernel on the transposed codes, the masked accumulation's dV by the
same masked-accumulation kernel on the transposed bits; the dense parts (dW = g^T x, the STE of
the float master weights; dB = V g^T) are torch matmuls.

- ``ShiftLinear``: float master weights; in training/float forward the weights are quantized to
  sign * 2^p by the clipped straight-through estimator (quant.py) and the product is
  ``shift_linear_float`` (CPU, or ``backend="torch"``) or, on CUDA, one of the paths of paths.py
  (``path="auto"``: measured or estimated latencies per shape; or "shift" | "packed" | "fp8" |
  "dense"; ``describe(m)`` prints the decision); ``quantize=False`` gives a plain float linear.  The
  integer inference path (``forward_fixed`` / ``int_forward``) takes Q16.16 activations and the
  packed 5/6-bit codes through the TVM llvm kernel, bit-exact with ``shift_linear_ref``.
- ``AddAttention``: ShiftAddViT's linear-angular attention with binarized queries and keys (the
  ``LinAngularAttention_binary`` module of GATECH-EIC/ShiftAddViT, pvt/pvt_v2.py; You et al.,
  NeurIPS 2023, after Castling-ViT's linear-angular attention, You et al., CVPR 2023), per head
  with q, k, v of shape [T, d]:

      q = q / |q|,  k = k / |k|                       (L2 over the head dim, per token)
      Bq = [q > mean(q)],  Bk = [k > mean(k)]          ({0,1}; the mean over the whole q (or k)
                                                        tensor of the batch, as in that code)
      A  = Bk^T V                                      (d x d: code_accumulate, no multiply)
      Y  = 0.5 * V + (1/pi) * Bq A                     (Bq A: code_accumulate on Bq's columns)
      Y  = Y / |Y| + DWConv_tokens(V)                  (depthwise conv over the token axis,
                                                        kernel (res_kernel, 1), per head)

  then heads are concatenated and projected.  The binarization's backward is the reference
  code's STE ``B.detach() - clamp(q,0,1).detach() + clamp(q,0,1)``: the gradient passes where
  0 <= q <= 1 (torch's clamp gradient, bounds included).  ``binary=False`` keeps q, k in float
  (Castling-ViT's unbinarized form; gradcheckable).  1/pi and 0.5 come from the first-order
  expansion 1 - arccos(x)/pi ~ 1/2 + x/pi of the angular kernel.
- ``MoEMLP``: a router (a linear gate, softmax over all logits kept at each token's top k) over the experts
  {dense MLP, shift MLP} (fc - GELU - fc each; ShiftAddViT's PVT MLPs also hold a depthwise conv,
  left out here).  Routing, dispatch and combine are moe.py's: the layout of the expert-sorted,
  buffer -- compact by default (the kept rows packed by expert, device group ends; the experts as
  one torch._grouped_mm per linear when all are dense GEMMs: MoEMLP's doc) or fixed-capacity -- (on
  CUDA one launch of the generated plan kernel; no host sync), one launch of the
  generated dispatch kernel (row gather, 16-byte copies) and, after the experts ran on their
  rows of the buffer (the shift expert on ShiftLinear's chosen path), one launch of
  the generated combine kernel (the gate-weighted gather back, one write per token); their
  backward is the other kernel (autograd).  On a CPU the torch reference of moe.py.  The forward returns ``(y, balance_loss)`` with
  router.py's latency-aware loss; the latencies are given, or measured by
  ``measure_expert_latencies`` (wall-clock median of a few forward calls of each expert on a probe
  batch on the current device; on a CPU those are the torch float forms, not generated kernels).
  No noisy gating (the counted load has no gradient; the importance term has).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .add import code_accumulate, pack_bits
from .fixed import _I32, from_fixed, shift_linear_ref, to_fixed
from .quant import (ShiftFormatError, _check_bits, _check_range, codes_per_word, min_code_bits, pack_shift,
                    quantize_shift, unpack_shift)
from . import devinfo, paths as _paths
from .fp8 import shift_linear_fp8, weights_e5m2
from .packed import pad_words
from .paths import CHOICES, Decision, applicable, choose
from .quant import dequantize_shift
from .router import moe_balance_loss
from . import moe as _moe


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


BACKENDS = ("kernels", "torch")


def _check_backend(who: str, backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{who}: backend is one of {BACKENDS}, got {backend!r}")
    return backend


_SK: list = []


def kernel_ops():
    """pigeon/runtime/shiftadd_kernel.py, the launcher of the ShiftAdd kernels (imported when a CUDA
    tensor reaches a kernel; the benchmark calls its functions through this)."""
    if not _SK:
        from ..runtime import shiftadd_kernel
        _SK.append(shiftadd_kernel)
    return _SK[0]


_kernels = kernel_ops


# ---------------------------------------------------------------- shift linear

_KERNELS: dict = {}


def shift_kernel_llvm(p_min: int, p_max: int, bits: int):
    """The TVM shift-linear kernel (tvm_shift.py) built for llvm, cached per (p_min, p_max, bits)."""
    key = (p_min, p_max, bits)
    if key not in _KERNELS:
        import tvm
        from .tvm_shift import NAME, scheduled_module, shift_linear_primfunc
        lib = tvm.compile(scheduled_module(shift_linear_primfunc(p_min, p_max, bits), "llvm"), target="llvm")
        _KERNELS[key] = (lib, lib[NAME])
    return _KERNELS[key][1]


def _linear(x, w, b):
    """x w^T (+ b): the bias fused into the matmul when the dtypes agree."""
    if b is None or b.dtype == x.dtype:
        return F.linear(x, w, b)
    return F.linear(x, w) + b


class _ShiftLinearFn(torch.autograd.Function):
    """y = x Wq^T with Wq = quantize_shift(w); backward: dx = g Wq, dW = g^T x where
    |w| <= 2^p_max (the clipped STE of quant.py), else 0.

    The quantized weights and their derived forms come from the layer's cache of the current
    weight state (ShiftLinear._forms: computed once per optimizer step, not per call).  ``gpu``
    False: the torch forms (x Wq^T in x's dtype).  True: a CUDA run on the layer's chosen path
    (ShiftLinear.run_path); dx by the shift kernel on the transposed codes (the dense path: a torch
    matmul), dW a torch matmul."""

    @staticmethod
    def forward(ctx, x, w, layer, gpu):
        forms = layer._forms()
        x2 = x.reshape(-1, x.shape[-1])
        if gpu:
            y = layer.run_path(x2)
        else:
            y = x2 @ layer._form(forms, "dense", x.dtype).T
        ctx.save_for_backward(x2, w)
        ctx.layer, ctx.forms, ctx.gpu = layer, forms, gpu
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        layer, forms = ctx.layer, ctx.forms
        gx = gw = None
        if ctx.needs_input_grad[0]:
            if not ctx.gpu or layer.last_path == "dense":
                gx = g2 @ layer._form(forms, "dense", g2.dtype)
            else:
                gx = _kernels().shift_linear(g2.float().contiguous(), layer._form(forms, "shift_t"), layer.p_min,
                                             layer.p_max, layer.bits).to(g2.dtype)
            gx = gx.reshape(*g.shape[:-1], w.shape[1])
        if ctx.needs_input_grad[1]:
            gw = torch.where(layer._form(forms, "clip"), (g2.T @ x2.to(g2.dtype)).to(w.dtype), 0.0)
        return gx, gw, None, None


class ShiftLinear(torch.nn.Module):
    """y = x @ (sign * 2^p)^T + b with float master weights (module doc).

    Per call only the work of the call is done: the quantized weights and every form a path takes
    (packed codes, padded codes, e5m2, dequantized, the transposed codes of the backward) are made
    once per weight state ``(id, data_ptr, _version)`` of ``weight`` -- so once per optimizer step
    in training, once in inference -- and the path decision once per (rows, dtype, device) (again
    when ``path`` changes or the measured latency table is reloaded).  The packed path adds the bias
    in its kernel; the fp8 path in place into the product."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, p_min: int = -15, p_max: int = 0,
                 bits: int | None = None, quantize: bool = True, backend: str = "kernels", path: str = "auto"):
        super().__init__()
        self.backend = _check_backend("ShiftLinear", backend)
        if path not in CHOICES:
            raise ValueError(f"ShiftLinear: path is one of {CHOICES}, got {path!r}")
        self.path = path
        self.last_path = self.last_decision = None
        _check_range(p_min, p_max)
        bits = min_code_bits(p_min, p_max) if bits is None else bits
        _check_bits(p_min, p_max, bits)
        self.in_features, self.out_features = in_features, out_features
        self.p_min, self.p_max, self.bits, self.quantize = p_min, p_max, bits, quantize
        bound = 1 / math.sqrt(in_features)
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None
        self._packed = None
        self._wstate = None          # the weight state the forms in _wcache belong to
        self._wcache: dict = {}
        self._bstate = self._bias32 = None
        self._plans: dict = {}       # (m, dtype, device) -> (paths.GENERATION, path, Decision)

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, "
                f"p={self.p_min}..{self.p_max}, bits={self.bits}, quantize={self.quantize}, path={self.path}, "
                f"backend={self.backend}")

    def _check_x(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ShiftFormatError(f"ShiftLinear: x has shape {_shape(x)}, expected [..., {self.in_features}]")

    # -- the cached forms of the weights
    def _forms(self) -> dict:
        """The dict of weight forms for the current weight state (a new one after any change)."""
        w = self._parameters["weight"]
        state = (id(w), w.data_ptr(), w._version)
        if state != self._wstate:
            self._wstate, self._wcache = state, {}
        return self._wcache

    def _form(self, forms: dict, kind: str, dtype=None):
        got = forms.get((kind, dtype))
        if got is None:
            q = forms.get("q")
            if q is None:
                q = forms["q"] = quantize_shift(self.weight.detach(), self.p_min, self.p_max)
            sign, p = q
            if kind == "shift":
                got = pack_shift(sign, p, self.p_min, self.p_max, self.bits)
            elif kind == "shift_t":                      # the backward's dx = g Wq: codes of Wq^T
                got = pack_shift(sign.T.contiguous(), p.T.contiguous(), self.p_min, self.p_max, self.bits)
            elif kind == "packed":
                got = pad_words(self._form(forms, "shift"), self.in_features, self.bits)
            elif kind == "fp8":
                got = weights_e5m2(sign, p)
            elif kind == "dense":
                got = dequantize_shift(sign, p, dtype)
            elif kind == "clip":                         # where the STE passes the gradient
                got = self.weight.detach().abs() <= 2.0 ** self.p_max
            else:
                raise ValueError(f"ShiftLinear: no weight form {kind!r}")
            forms[(kind, dtype)] = got
        return got

    def _bias_f32(self):
        """The bias as float32 for the packed kernel (itself when it is float32 already)."""
        b = self._parameters["bias"]
        if b.dtype == torch.float32:
            return b                                     # the kernel reads its memory; no graph here
        state = (id(b), b.data_ptr(), b._version)
        if state != self._bstate:
            self._bstate, self._bias32 = state, b.detach().float()
        return self._bias32

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            self._check_x(x)
        if not x.is_floating_point():
            raise ShiftFormatError(f"ShiftLinear.forward takes a floating-point x, got {x.dtype} "
                                   "(int32 Q16.16 goes through int_forward)")
        params = self._parameters                # (Module.__getattr__ is slow on the hot path)
        w, b = params["weight"], params.get("bias")
        if not self.quantize:
            return F.linear(x, w, b)
        gpu = self.backend == "kernels" and devinfo.on_gpu(x)
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
            y = _ShiftLinearFn.apply(x, w, self, gpu)
            return y if b is None else y + b
        # inference: nothing here records a graph
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if gpu:
            y = self.run_path(x2, bias=True)
        else:
            y = _linear(x2, self._form(self._forms(), "dense", x.dtype), b)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def decide(self, m: int, dtype: torch.dtype, device) -> Decision:
        """The path a CUDA call with ``m`` rows of ``dtype`` takes (paths.py): ``path`` when explicit
        (an error if it cannot run the shape), else the fastest by measured or estimated latency."""
        cap, gpu, _ = devinfo.props(device)
        is_cuda = gpu is not None
        dt = str(dtype).replace("torch.", "")
        fp8_ok = is_cuda and cap >= (8, 9)
        n, k = self.out_features, self.in_features
        if self.path != "auto":
            why = applicable(m, n, k, dt, self.p_min, self.p_max, fp8_ok).get(self.path)
            if why:
                raise ShiftFormatError(f"ShiftLinear(path={self.path!r}) cannot run [{m}, {k}] x [{k}, {n}] {dt}: {why}")
            return Decision(self.path, "explicit", {}, {}, (m, n, k, dt))
        return choose(m, n, k, dt, p_min=self.p_min, p_max=self.p_max, bits=self.bits, gpu=gpu, fp8_ok=fp8_ok)

    def describe(self, m: int, dtype=torch.bfloat16, device="cuda") -> str:
        """The decision for a call with ``m`` rows, as one line."""
        return self.decide(m, dtype, device).describe()

    def _plan(self, m: int, dtype, device) -> Decision:
        key = (m, dtype, device)
        got = self._plans.get(key)
        if got is None or got[0] != _paths.GENERATION or got[1] != self.path:
            got = self._plans[key] = (_paths.GENERATION, self.path, self.decide(m, dtype, device))
        return got[2]

    def run_path(self, x2: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """x2 [M, K] (CUDA) times the quantized weights on the decided path, in x2's dtype (``bias``:
        plus the layer's bias, fused where the path can)."""
        d = self._plan(x2.shape[0], x2.dtype, x2.device)
        if self.__dict__["last_decision"] is not d:           # plain attributes: skip Module.__setattr__
            self.__dict__["last_path"], self.__dict__["last_decision"] = d.path, d
        forms = self._forms()
        path = d.path
        b = self._parameters.get("bias") if bias else None
        if path == "packed":
            return _kernels().packed_linear(x2, self._form(forms, "packed"), self.in_features, self.p_min, self.p_max,
                                            self.bits, None if b is None else self._bias_f32())
        if path == "fp8":
            return shift_linear_fp8(x2, self._form(forms, "fp8"), x2.dtype, b)
        if path == "shift":
            y = _kernels().shift_linear(x2 if x2.dtype == torch.float32 else x2.float(), self._form(forms, "shift"),
                                        self.p_min, self.p_max, self.bits)
            if y.dtype != x2.dtype:
                y = y.to(x2.dtype)
            return y if b is None else y.add_(b)
        return _linear(x2, self._form(forms, "dense", x2.dtype), b)

    # -- integer inference path
    def pack(self) -> torch.Tensor:
        """The packed codes of the current weights (int32 [N, ceil(K / (32 // bits))]), kept for inference."""
        sign, p = quantize_shift(self.weight.detach(), self.p_min, self.p_max)
        self._packed = pack_shift(sign, p, self.p_min, self.p_max, self.bits)
        return self._packed

    def load_packed(self, packed: torch.Tensor) -> None:
        """Use ``packed`` (pack_shift's format for this layer's range and width) for inference."""
        per = codes_per_word(self.bits)
        words = math.ceil(self.in_features / per)
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32 or \
                tuple(packed.shape) != (self.out_features, words):
            raise ShiftFormatError(
                f"ShiftLinear: packed weights have shape {_shape(packed)}"
                f"{'' if not isinstance(packed, torch.Tensor) else ' ' + str(packed.dtype)}, expected int32 "
                f"[{self.out_features}, {words}] ({self.in_features} {self.bits}-bit codes, {per} per word)")
        unpack_shift(packed, self.in_features, self.p_min, self.p_max, self.bits)   # checks the exponent fields
        self._packed = packed

    def int_forward(self, xq: torch.Tensor) -> torch.Tensor:
        """int32 [M, N] = sum_k sign * (xq >> -p) for Q16.16 int32 ``xq [M, K]`` (no bias), by the TVM
        kernel on the packed codes (``pack()`` or ``load_packed()``; packed now if neither ran): the
        llvm build on a CPU, the generated CUDA kernel on a CUDA ``xq``."""
        if not isinstance(xq, torch.Tensor) or xq.dtype != torch.int32:
            raise ShiftFormatError(f"ShiftLinear.int_forward: x must be an int32 Q16.16 tensor (to_fixed), got "
                                   f"{xq.dtype if isinstance(xq, torch.Tensor) else type(xq).__name__}")
        if xq.dim() != 2 or xq.shape[1] != self.in_features:
            raise ShiftFormatError(f"ShiftLinear.int_forward: x has shape {_shape(xq)}, expected [M, {self.in_features}]")
        if self.p_min < -30:
            raise ShiftFormatError(f"the fixed-point shift kernel takes p_min >= -30, this layer has {self.p_min}")
        if xq.device.type not in ("cpu", "cuda"):
            raise ShiftFormatError(f"ShiftLinear.int_forward runs on the CPU or CUDA; x is on {xq.device}")
        packed = self._packed if self._packed is not None else self.pack()
        packed = packed.to(xq.device)
        # |x >> s| <= |x| for s >= 0: if sum_k |x| fits int32 no partial sum can overflow (fixed.py)
        if (xq.to(torch.int64).abs().sum(1) > _I32[1]).any():
            sign, p = unpack_shift(packed, self.in_features, self.p_min, self.p_max, self.bits)
            terms = (xq.to(torch.int64).unsqueeze(1) >> (-p.to(torch.int64)).unsqueeze(0)) * sign.to(torch.int64)
            if (terms.abs().sum(-1) > _I32[1]).any():
                raise OverflowError("ShiftLinear.int_forward: sum_k |term| reaches 2^31 for some output; "
                                    "int32 accumulation could overflow (scale x down)")
        if xq.is_cuda:
            if self.backend == "torch":
                sign, p = unpack_shift(packed, self.in_features, self.p_min, self.p_max, self.bits)
                return shift_linear_ref(xq, sign, p)
            return _kernels().shift_linear(xq.contiguous(), packed.contiguous(), self.p_min, self.p_max, self.bits)
        out = torch.empty(xq.shape[0], self.out_features, dtype=torch.int32)
        shift_kernel_llvm(self.p_min, self.p_max, self.bits)(xq.contiguous(), packed.contiguous(), out)
        return out

    def forward_fixed(self, x: torch.Tensor) -> torch.Tensor:
        """Float in, float out through Q16.16 and the integer kernel: from_fixed(int_forward(to_fixed(x))) + b."""
        self._check_x(x)
        lead = x.shape[:-1]
        y = from_fixed(self.int_forward(to_fixed(x.reshape(-1, self.in_features))), x.dtype)
        y = y.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias.detach()


# ---------------------------------------------------------------- add attention

class _BinarizeSTE(torch.autograd.Function):
    """Forward: [x > mean(x)] as {0, 1}; backward: g where 0 <= x <= 1 (ShiftAddViT's clamp STE)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x > x.mean()).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.where((x >= 0) & (x <= 1), g, torch.zeros_like(g))


def _bits_of(b: torch.Tensor) -> torch.Tensor:
    return pack_bits(b > 0.5)


class _MaskedAccumulate(torch.autograd.Function):
    """out[g] = B[g]^T V[g] with B in {0, 1} [G, T, m] (as float) by the add primitive on B's packed
    bits (CPU: add.py's code_accumulate per problem; CUDA with ``kernels``: the TVM kernel, batched);
    backward as for the matmul: dB = V g^T (torch), dV = B g (CUDA: the same kernel on B^T's bits)."""

    @staticmethod
    def forward(ctx, b, v, kernels):
        ctx.save_for_backward(b, v)
        ctx.kernels = kernels
        if kernels:
            return _kernels().code_accumulate(pack_bits(b > 0.5), v.float().contiguous(), b.shape[2]).to(v.dtype)
        return torch.stack([code_accumulate(_bits_of(b[i]), v[i], b.shape[2]) for i in range(b.shape[0])])

    @staticmethod
    def backward(ctx, g):
        b, v = ctx.saved_tensors
        gb = v @ g.transpose(1, 2) if ctx.needs_input_grad[0] else None
        gv = None
        if ctx.needs_input_grad[1]:
            gv = (_kernels().code_accumulate(pack_bits(b.transpose(1, 2) > 0.5), g.float().contiguous(),
                                             b.shape[1]).to(v.dtype) if ctx.kernels else b @ g)
        return gb, gv, None


def masked_accumulate(b: torch.Tensor, v: torch.Tensor, backend: str = "kernels") -> torch.Tensor:
    """``b^T @ v`` for a {0, 1} float ``b [T, m]`` (or batched ``[G, T, m]`` with ``v [G, T, n]``) by
    the add primitive (masked sums, no multiply); the generated kernel on CUDA (``backend="kernels"``)."""
    _check_backend("masked_accumulate", backend)
    two = b.dim() == 2
    b3, v3 = (b.unsqueeze(0), v.unsqueeze(0)) if two else (b, v)
    out = _MaskedAccumulate.apply(b3, v3, b.is_cuda and backend == "kernels")
    return out[0] if two else out


class AddAttention(torch.nn.Module):
    """ShiftAddViT's linear-angular attention with binarized q, k (module doc). x: [B, N, dim]."""

    def __init__(self, dim: int, heads: int = 2, qkv_bias: bool = False, res_kernel: int = 9,
                 binary: bool = True, linear: str = "dense", backend: str = "kernels"):
        super().__init__()
        self.backend = _check_backend("AddAttention", backend)
        if dim % heads:
            raise ValueError(f"AddAttention: dim={dim} is not divisible by heads={heads}")
        if linear not in ("dense", "shift"):
            raise ValueError(f"AddAttention: linear is 'dense' or 'shift', got {linear!r}")
        self.dim, self.heads, self.binary = dim, heads, binary
        mk = (lambda i, o, b: torch.nn.Linear(i, o, bias=b)) if linear == "dense" else \
             (lambda i, o, b: ShiftLinear(i, o, bias=b, backend=backend))
        self.qkv = mk(dim, 3 * dim, qkv_bias)
        self.proj = mk(dim, dim, True)
        self.dconv = torch.nn.Conv2d(heads, heads, kernel_size=(res_kernel, 1), padding=(res_kernel // 2, 0),
                                     bias=False, groups=heads)

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"AddAttention: x has shape {_shape(x)}, expected [B, N, {self.dim}]")
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                       # [B, h, N, d]
        q = q / q.norm(dim=-1, keepdim=True)
        k = k / k.norm(dim=-1, keepdim=True)
        if self.binary:
            q, k = _BinarizeSTE.apply(q), _BinarizeSTE.apply(k)
            d = c // self.heads
            g = b * self.heads                                               # one problem per (batch, head)
            a = masked_accumulate(k.reshape(g, n, d), v.reshape(g, n, d), self.backend)          # Bk^T V [g, d, d]
            qkv_ = masked_accumulate(q.reshape(g, n, d).transpose(1, 2).contiguous(), a,
                                     self.backend).reshape(b, self.heads, n, d)                 # Bq A [g, N, d]
        else:
            qkv_ = q @ (k.transpose(-2, -1) @ v)
        y = 0.5 * v + (1.0 / math.pi) * qkv_
        y = y / y.norm(dim=-1, keepdim=True) + self.dconv(v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


# ---------------------------------------------------------------- MoE dispatch / combine (moe.py's layout)

def _moe_dispatch_impl(x, src, k, scale, impl):
    if impl == "torch":
        return _moe.dispatch_ref(x, src, k, scale)
    return _kernels().moe_dispatch(x, src, k, None if scale is None else scale.float(), emulate=impl == "emulate")


def _moe_combine_impl(ys, slot, gate, impl):
    if impl == "torch":
        return _moe.combine_ref(ys, slot, gate)
    return _kernels().moe_combine(list(ys), slot, None if gate is None else gate.float(), emulate=impl == "emulate")


def _moe_split(buf, experts, c):
    return buf.view(experts, c, buf.shape[1]).unbind(0)


class _MoEDispatch(torch.autograd.Function):
    """buf = dispatch(x); backward: dx = the unscaled combine of dbuf (the same kernels)."""

    @staticmethod
    def forward(ctx, x, slot, src, k, experts, c, impl):
        ctx.save_for_backward(slot)
        ctx.meta = (experts, c, impl)
        return _moe_dispatch_impl(x, src, k, None, impl)

    @staticmethod
    def backward(ctx, g):
        (slot,) = ctx.saved_tensors
        experts, c, impl = ctx.meta
        gx = None
        if ctx.needs_input_grad[0]:
            gx = _moe_combine_impl(_moe_split(g.contiguous(), experts, c), slot, None, impl)
        return gx, None, None, None, None, None, None


class _MoECombine(torch.autograd.Function):
    """out = combine(ys, gate); backward: dys = the dispatch of dout scaled by the gates (the same
    kernels), dgate[t, j] = <dout[t], y[slot[t, j]]> (torch ops; 0 for a dropped slot)."""

    @staticmethod
    def forward(ctx, gate, slot, src, impl, *ys):
        ctx.save_for_backward(gate, slot, src, *ys)
        ctx.impl = impl
        return _moe_combine_impl(ys, slot, gate, impl)

    @staticmethod
    def backward(ctx, g):
        gate, slot, src, *ys = ctx.saved_tensors
        impl, (t, k), e, c = ctx.impl, slot.shape, len(ys), ys[0].shape[0]
        g = g.contiguous()
        ggate = None
        if ctx.needs_input_grad[0]:
            acc = _moe._acc_dtype(g.dtype)
            y = torch.cat(ys) if e > 1 else ys[0]
            rows = y.index_select(0, slot.reshape(-1).clamp_min(0).long()).view(t, k, -1).to(acc)
            dots = (rows * g.to(acc).unsqueeze(1)).sum(-1)
            ggate = torch.where(slot >= 0, dots, torch.zeros((), dtype=acc, device=g.device)).to(gate.dtype)
        gys = [None] * e
        if any(ctx.needs_input_grad[4:]):
            gys = list(_moe_split(_moe_dispatch_impl(g, src, k, gate, impl), e, c))
        return (ggate, None, None, None, *gys)


def _moe_impl(t: torch.Tensor, backend: str) -> str:
    if backend not in _moe.BACKENDS:
        raise ValueError(f"MoE dispatch/combine: backend is one of {_moe.BACKENDS}, got {backend!r}")
    if backend == "kernels":
        return "kernels" if t.dtype != torch.float64 and devinfo.on_gpu(t) else "torch"
    return backend


def moe_route(expert_ids: torch.Tensor, experts: int, capacity: int | None = None, backend: str = "kernels",
              layout: str = "capacity"):
    """moe.route's layout (a moe.Routing; ``layout`` "capacity" | "compact"): on CUDA
    (``backend="kernels"``) one launch of the generated plan kernel, with ``"emulate"`` its text on
    the CPU, else moe.route's torch ops."""
    if layout not in _moe.LAYOUTS:
        raise _moe.MoERoutingError(f"layout is one of {_moe.LAYOUTS}, got {layout!r}")
    impl = _moe_impl(expert_ids, backend) if isinstance(expert_ids, torch.Tensor) else "torch"
    if impl == "torch":
        return _moe.route(expert_ids, experts, capacity, layout)
    t = expert_ids.shape[0] if expert_ids.dim() == 2 else -1
    _moe.check_routing(expert_ids, None, t, experts)
    c = t if capacity is None else int(capacity)
    if c < 0:
        raise _moe.MoERoutingError(f"capacity must be >= 0, got {capacity}")
    out = _kernels().moe_plan(expert_ids, experts, c, emulate=impl == "emulate", layout=layout)
    return _moe.Routing(*out[:3], experts, c, expert_ids.shape[1], layout, out[3] if len(out) > 3 else None)


def moe_dispatch(x: torch.Tensor, routing, backend: str = "kernels") -> torch.Tensor:
    """The expert-sorted buffer ``[R, D]`` of ``x [T, D]`` for ``routing`` (moe.route; R = E * C, or
    the compact layout's min(T * k, E * C)); differentiable in x (module doc of moe.py)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != routing.tokens:
        raise _moe.MoERoutingError(f"dispatch: x must be [T={routing.tokens}, D], got {_moe._what(x)}")
    n, rows = routing.groups()
    return _MoEDispatch.apply(x, routing.slot, routing.src, routing.k, n, rows, _moe_impl(x, backend))


def moe_combine(ys, routing, gates: torch.Tensor | None, backend: str = "kernels") -> torch.Tensor:
    """``[T, D]`` from the E expert outputs ``ys`` (each ``[C, D]``; the compact layout: one ``[R, D]``,
    all experts' rows) and ``gates [T, k]`` (None: 1) for ``routing`` (moe.route); differentiable
    in ys and gates."""
    n, rows = routing.groups()
    if not isinstance(ys, (list, tuple)) or len(ys) != n or \
            any(not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != rows for y in ys):
        what = f"{n} expert outputs [C={rows}, D]" if routing.layout == "capacity" else \
            f"one output [R={rows}, D] (the compact layout)"
        raise _moe.MoERoutingError(f"combine: ys must be {what}, "
                                   f"got {[_moe._what(y) for y in ys] if isinstance(ys, (list, tuple)) else _moe._what(ys)}")
    if gates is not None and (not isinstance(gates, torch.Tensor) or not gates.is_floating_point() or
                              gates.shape != routing.slot.shape or gates.device != routing.slot.device):
        raise _moe.MoERoutingError(f"gates must be a floating-point [T, k] = {tuple(routing.slot.shape)} tensor on "
                                   f"{routing.slot.device}, got {_moe._what(gates)}")
    return _MoECombine.apply(gates, routing.slot, routing.src, _moe_impl(ys[0], backend), *ys)


# ---------------------------------------------------------------- mixture of multiplication primitives

class _MLP(torch.nn.Module):
    def __init__(self, dim, hidden, shift: bool, backend: str = "kernels"):
        super().__init__()
        lin = (lambda i, o: ShiftLinear(i, o, backend=backend)) if shift else torch.nn.Linear
        self.fc1, self.fc2 = lin(dim, hidden), lin(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def measure_expert_latencies(experts, dim: int, tokens: int = 256, reps: int = 5, device=None,
                             dtype=torch.float32) -> torch.Tensor:
    """Median wall-clock seconds of one forward (no grad) of each expert on a random ``[tokens, dim]``
    batch, on ``device`` (the experts' device by default), after one warm-up call; CUDA is
    synchronized around each call.  A simple timing, not a benchmark."""
    out = []
    for e in experts:
        dev = torch.device(device) if device is not None else next(e.parameters()).device
        x = torch.randn(tokens, dim, device=dev, dtype=dtype)
        ts = []
        with torch.no_grad():
            for i in range(reps + 1):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                e(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if i:
                    ts.append(time.perf_counter() - t0)
        out.append(sorted(ts)[len(ts) // 2])
    return torch.tensor(out, dtype=torch.float64)


class _ShiftSTE(torch.autograd.Function):
    """The dequantized shift weights ``wq`` (ShiftLinear's cached "dense" form) as a function of the
    master weights ``w``: forward wq, backward the clipped STE (where |w| <= 2^p_max, else 0), the
    gradient _ShiftLinearFn gives w."""

    @staticmethod
    def forward(ctx, w, wq, clip):
        ctx.save_for_backward(clip)
        return wq

    @staticmethod
    def backward(ctx, g):
        (clip,) = ctx.saved_tensors
        return torch.where(clip, g, 0.0).to(g.dtype), None, None


def _gemm_weights(lin, x, rows: int):
    """(w [N, K], b [N] or None) in x's dtype when ``lin`` computes x w^T + b as one plain GEMM on
    ``rows`` rows of x (a torch.nn.Linear; a ShiftLinear unquantized, on the torch backend, or whose
    path for ``rows`` rows is "dense": its dequantized sign * 2^p, exact in bf16/fp16), else None.
    The shift weights keep their gradient (the clipped STE)."""
    if lin._forward_hooks or lin._forward_pre_hooks:
        return None
    params = lin._parameters
    w, b = params["weight"], params.get("bias")
    if type(lin) is ShiftLinear and lin.quantize:
        if lin.backend == "kernels":
            d = lin._plan(rows, x.dtype, x.device)
            if d.path != "dense":
                return None
            if lin.__dict__["last_decision"] is not d:
                lin.__dict__["last_path"], lin.__dict__["last_decision"] = d.path, d
        forms = lin._forms()
        wq = lin._form(forms, "dense", x.dtype)
        if torch.is_grad_enabled() and w.requires_grad:
            wq = _ShiftSTE.apply(w, wq, lin._form(forms, "clip"))
        w = wq
    elif type(lin) not in (torch.nn.Linear, ShiftLinear):
        return None
    if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        return None
    return w, b


def _grouped_linear(h, ws, bs, ends, groups):
    """h [R, K] times each expert's w^T over its rows (ends: the group ends), one torch._grouped_mm;
    the biases added per row (the row's expert, ``groups``).  Rows past ends[E - 1] are left
    unwritten by _grouped_mm (never read: no slot points there)."""
    y = torch._grouped_mm(h, torch.stack(ws).transpose(1, 2), offs=ends)
    if any(b is not None for b in bs):
        zero = next(b for b in bs if b is not None).new_zeros(())
        bias = torch.stack([b if b is not None else zero.expand(ws[0].shape[0]) for b in bs])
        # as a [R, E] one-hot times [E, N] matmul, not bias.index_select(0, groups): the latter's
        # backward is an index_add_ in the bias dtype (bf16 sums over thousands of rows: the fc1 bias
        # gradient 6% off the capacity layout's on the H200), the matmul's sums in float32
        y = torch.addmm(y, torch.nn.functional.one_hot(groups, len(bs)).to(y.dtype), bias.to(y.dtype))
    return y


class MoEMLP(torch.nn.Module):
    """Top-k router over experts {dense MLP, shift MLP}; forward(x [T, dim]) -> (y, balance_loss).

    Per call (module doc): the gate GEMM, softmax, top-k; one plan launch (moe.route's layout); one dispatch
    launch into the ``[E * C, dim]`` buffer; each expert on its ``C`` rows (a view: static shapes,
    so the shift expert's path decision is made once per C); one combine launch.  No host sync.
    ``capacity_factor`` None: C = T (exact: no token is dropped; each expert computes T rows, the
    empty ones included); a number f: C = min(T, ceil(f * T * k / E)) rounded up to 8, tokens past
    an expert's capacity (in token order) get no contribution from it (Switch-style dropping).
    ``backend``: of the dispatch/combine kernels and the shift expert ("kernels" | "torch").

    ``layout`` "compact" (the default) packs the kept rows by expert with no padding (moe.py's
    compact layout: ``R = min(T * k, E * C)`` rows, the group ends ``ends`` on the device), so each
    expert computes only its routed rows:

    - on CUDA in bf16, when every expert linear is one plain GEMM (a torch.nn.Linear, or a
      ShiftLinear whose path for C rows is "dense": its dequantized weights, exact in bf16), each of
      the MLP's two linears for all experts is ONE ``torch._grouped_mm`` over the compact rows with
      the experts' weights stacked ``[E, K, N]`` (a copy per call, ~E*K*N elements: a CUDA-graph
      replay then reads in-place weight updates, as it does for the capacity layout), the GELU
      elementwise between them; autograd through _grouped_mm's own backward (and the clipped STE
      of the shift weights);
    - on other devices (CPU, meta) the torch reference: every expert over all R rows, each row
      keeping its own expert's result (E times the work; the oracle of the grouped path, no host read);
    - on CUDA otherwise (a shift linear on its shift / packed / fp8 kernel, fp16 / fp32, no
      _grouped_mm, rows not 16-byte multiples, hooks on the expert modules): the capacity layout's
      forward, so still no host sync (no per-expert row count is read on the host anywhere).

    ``layout="capacity"``: the fixed-capacity buffer ``[E * C, dim]`` (each expert on all C rows,
    padding included; the previous formulation, kept as the reference).  Both layouts keep and drop
    the same choices and give the same outputs to within float rounding."""

    EXPERTS = ("dense", "shift")
    LAYOUTS = _moe.LAYOUTS
    _GROUPED_DEVICES = ("cuda",)         # the CPU tests add "cpu" (torch._grouped_mm's CPU kernel, float32)

    def __init__(self, dim: int, hidden: int, k: int = 1, latencies=None, experts=EXPERTS,
                 capacity_factor: float | None = None, backend: str = "kernels", layout: str = "compact"):
        super().__init__()
        if layout not in self.LAYOUTS:
            raise ValueError(f"MoEMLP: layout is one of {self.LAYOUTS}, got {layout!r}")
        self.layout = layout
        if not experts or any(e not in self.EXPERTS for e in experts):
            raise ValueError(f"MoEMLP: experts come from {self.EXPERTS}, got {experts!r}")
        if not 0 < k <= len(experts):
            raise ValueError(f"MoEMLP: top-k needs 0 < k <= {len(experts)} experts, got k={k}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"MoEMLP: capacity_factor is None or > 0, got {capacity_factor!r}")
        self.backend = _check_backend("MoEMLP", backend)
        self.dim, self.k, self.capacity_factor = dim, k, capacity_factor
        self.experts = torch.nn.ModuleList(_MLP(dim, hidden, e == "shift", backend) for e in experts)
        self.gate = torch.nn.Linear(dim, len(experts), bias=False)
        if latencies is None:
            latencies = measure_expert_latencies(self.experts, dim)
        latencies = torch.as_tensor(latencies, dtype=torch.float64)
        if latencies.shape != (len(experts),) or (latencies <= 0).any():
            raise ValueError(f"MoEMLP: latencies must be {len(experts)} positive numbers, got {latencies.tolist()}")
        self.register_buffer("latencies", latencies)

    def capacity(self, tokens: int) -> int:
        """Rows per expert in the dispatch buffer for ``tokens`` tokens."""
        if self.capacity_factor is None:
            return tokens
        c = math.ceil(self.capacity_factor * tokens * self.k / len(self.experts))
        return min(tokens, -(-c // 8) * 8)

    def _topk(self, x):
        prob = torch.softmax(self.gate(x), dim=1)
        top, idx = prob.topk(self.k, dim=1)
        return prob, top, idx

    def gates(self, x):
        """softmax over all experts' logits, zero outside each token's top k (Switch-style: with k = 1
        the softmax over the top k alone, as in Shazeer et al.'s gate, would be 1 and give the
        router no gradient)."""
        prob, top, idx = self._topk(x)
        return torch.zeros_like(prob).scatter(1, idx, top)

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MoEMLP: x has shape {_shape(x)}, expected [T, {self.dim}]")
        if x.device.type in self._REPLAY_DEVICES:
            out = self._replayed(x)
            if out is not None:
                return out
        return self._forward(x, self._buffers["latencies"])

    def _forward(self, x, latencies):
        """The plain forward (routing, dispatch, experts, combine, balance loss)."""
        prob, top, idx = self._topk(x)
        gates = torch.zeros_like(prob).scatter(1, idx, top)
        loss = moe_balance_loss(gates, latencies.to(x.dtype))
        t, e = x.shape[0], len(self.experts)
        if t == 0:
            return torch.zeros_like(x), loss
        c = self.capacity(t)
        how = self.compact_plan(x, c) if self.layout == "compact" else None
        if how is None:
            r = moe_route(idx, e, c, self.backend)
            buf = moe_dispatch(x, r, self.backend)
            ys = [expert(buf[i * c:(i + 1) * c]) for i, expert in enumerate(self.experts)]
            return moe_combine(ys, r, top, self.backend), loss
        r = moe_route(idx, e, c, self.backend, layout="compact")
        buf = moe_dispatch(x, r, self.backend)
        groups = _moe.row_groups(r.ends, r.rows)
        if how == "grouped":
            w1, w2 = self.__dict__.pop("_gemms")
            h = F.gelu(_grouped_linear(buf, [w for w, _ in w1], [b for _, b in w1], r.ends, groups))
            y = _grouped_linear(h, [w for w, _ in w2], [b for _, b in w2], r.ends, groups)
        else:
            y = None
            for i, expert in enumerate(self.experts):
                ye = expert(buf)
                y = ye if y is None else torch.where((groups == i).unsqueeze(1), ye, y)
        return moe_combine([y], r, top, self.backend), loss

    def compact_plan(self, x, c: int):
        """How the compact layout computes the experts for x with capacity c: "grouped"
        (torch._grouped_mm; the GEMM weights left in ``_gemms`` for the forward), "reference" (not a
        CUDA device), or None: the capacity layout (class doc).  Host-side only (no tensor read)."""
        dev = x.device.type
        if dev not in self._GROUPED_DEVICES:
            return "reference" if dev != "cuda" else None
        if not hasattr(torch, "_grouped_mm") or x.dim() != 2 or (x.shape[1] * x.element_size()) % 16:
            return None
        if dev == "cuda":
            if x.dtype != torch.bfloat16 or not devinfo.on_gpu(x) or devinfo.props(x.device)[0] < (9, 0):
                return None
        elif x.dtype not in (torch.float32, torch.bfloat16):
            return "reference"
        w1, w2 = [], []
        for ex in self.experts:
            if type(ex) is not _MLP or ex._forward_hooks or ex._forward_pre_hooks:
                return None
            a, b = _gemm_weights(ex.fc1, x, c), _gemm_weights(ex.fc2, x, c)
            if a is None or b is None or (a[0].shape[0] * x.element_size()) % 16:
                return None
            w1.append(a)
            w2.append(b)
        self.__dict__["_gemms"] = (w1, w2)
        return "grouped"

    # -- CUDA-graph replay of the steady-state no-grad forward (pigeon/runtime/replay.py)
    #
    # Host-bound without it (H200 at 4bbab3d, T=6272, dim 320, hidden 1280, bf16: 0.80 ms of wall
    # time per call for 0.17 ms of kernels; ~50 small torch ops and 3 generated launches).  The
    # forward has static shapes and no host read, so one CUDA graph per key replays all of it.
    # Only when: the device is a CUDA one, no autograd graph would be recorded (grad off, or nothing
    # requires grad), x contiguous, not under autocast, every weight a contiguous Parameter of the
    # modules __init__ built (no hooks on them), and replay.use_replay's rule (PIGEON_CUDA_GRAPHS,
    # not compiling / capturing, not under PIGEON_SYNC_LAUNCH / PIGEON_CHECK_INDICES, the size rule).
    # The key holds everything the captured work depends on: x's shape, dtype and device, the
    # capacity C, k, the backends, inference mode, PIGEON_POISON, each weight's address (read
    # in place), and per ShiftLinear expert layer the path it takes for C rows (ShiftLinear._plan:
    # decided here, before any capture) and its weight / bias versions (its weight forms -- codes,
    # e5m2, dequantized -- are cached host-side per weight state, so an in-place update makes a new
    # key: one plain call, captured on the next; a plain Linear's in-place update is read by the
    # replay itself).  The latencies buffer is copied in with x (one fused copy); y and the
    # balance loss come back as clones.

    _REPLAY_DEVICES = ("cuda",)          # the CPU tests add "cpu" (with a stand-in for CUDA graphs)
    _rt = None                           # pigeon.runtime.replay, imported on the first CUDA call
    _PARAM_NAMES: dict = {}              # number of weights -> their names in the ReplaySet call

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_replays", None)      # captured graphs (and a lock) neither pickle nor copy
        return state

    def _replay_leaves(self):
        """[gate, expert 0 fc1, fc2, expert 1 fc1, fc2, ...], or None when the structure is not the
        one __init__ built or a hook is set on one of them (hooks run Python a replay would skip)."""
        mods = self._modules
        gate = mods.get("gate")
        if type(gate) is not torch.nn.Linear:
            return None
        leaves = [gate]
        for e in mods["experts"]._modules.values():
            if type(e) is not _MLP or e._forward_hooks or e._forward_pre_hooks:
                return None
            leaves.append(e._modules["fc1"])
            leaves.append(e._modules["fc2"])
        for m in leaves:
            if type(m) not in (torch.nn.Linear, ShiftLinear) or m._modules or m._forward_hooks or \
                    m._forward_pre_hooks:
                return None
        return leaves

    def _replay_execute(self, inputs, params):
        y, loss = self._forward(inputs["x"], params["latencies"])
        return {"y": y, "loss": loss}, None

    def _replayed(self, x):
        """(y, balance_loss) through the module's ReplaySet (a key's first call plain, its second
        captured, later ones replayed), or None: the plain forward."""
        rt = MoEMLP._rt
        if rt is None:
            from ..runtime import replay as rt
            MoEMLP._rt = rt
        if not x.is_contiguous() or torch.is_autocast_enabled(x.device.type):
            return None
        t = x.shape[0]
        leaves = self._replay_leaves()
        if t == 0 or leaves is None:
            return None
        params = []
        for m in leaves:
            for p in m._parameters.values():
                if p is not None:
                    params.append(p)
        grad = torch.is_grad_enabled()
        if grad and (x.requires_grad or any(p.requires_grad for p in params)):
            return None                   # training: autograd records the plain ops
        for p in params:
            if not rt._in_place(p):
                return None
        c = self.capacity(t)
        e = len(leaves) // 2
        hidden = leaves[1].out_features
        # buffers touched once: x, y, the dispatch buffer, each expert's hidden (float32 at worst)
        # and output rows
        buffer_bytes = 4 * (3 * t * self.dim + e * c * (2 * self.dim + 2 * hidden))
        if not rt.use_replay("cuda", x.device, 3 + 4 * e, buffer_bytes, [x] + params):
            return None
        lat = self._buffers["latencies"]
        key = [tuple(x.shape), x.dtype, x.device, c, self.k, self.backend, self.layout,
               torch.is_inference_mode_enabled(), rt.getenv("PIGEON_POISON") == "1", lat.dtype, tuple(lat.shape)]
        gpu = None
        for m in leaves:
            for p in m._parameters.values():
                key.append(None if p is None else (p.data_ptr(), p.shape, p.dtype))
            if type(m) is ShiftLinear:
                w, b = m._parameters["weight"], m._parameters.get("bias")
                if gpu is None:
                    gpu = devinfo.on_gpu(x)
                path = m._plan(c, x.dtype, x.device).path if m.quantize and m.backend == "kernels" and gpu else None
                key.append((m.quantize, m.backend, path, w._version, None if b is None else b._version))
        rs = self.__dict__.get("_replays")
        if rs is None:
            rs = self.__dict__["_replays"] = rt.ReplaySet(f"MoEMLP(dim={self.dim}, hidden={hidden}, k={self.k})")
        names = self._PARAM_NAMES.get(len(params))
        if names is None:
            names = self._PARAM_NAMES[len(params)] = tuple(f"p{i}" for i in range(len(params)))
        par = dict(zip(names, params))
        par["latencies"] = lat
        out = rs.run(tuple(key), self._replay_execute, None, x.device, {"x": x}, par, ("x",),
                     names + ("latencies",))
        return None if out is None else (out["y"], out["loss"])
