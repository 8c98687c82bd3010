"""The ShiftAdd family's TVM-generated kernels, named: what each one is, how to make its TIR, and
how it is launched.  No torch, and TVM only inside ``scheduled(target)``: the GPU machine, which
has no TVM, imports this module to know a kernel's name, parameters and launch geometry, and
finds its CUDA source in the kernel cache (pigeon/runtime/shiftadd_kernel.py).

A ``TvmKernel`` is ``(kind, p_min, p_max, bits)`` (the exponent range only for the shift kinds):

- ``shift_int``: tvm_shift.shift_linear_primfunc, Q16.16 int32 ``x [M, K]``, packed ``w``, int32 out;
- ``shift_f32``: tvm_shift.shift_linear_f32_primfunc, float32 x and out;
- ``hamming``:   tvm_hamming.hamming_primfunc, ``nbits - popcount(q ^ k)``;
- ``accumulate``: tvm_add.code_accumulate_primfunc, batched masked accumulation B^T V.

``definition_digest()`` hashes the text of the files that define the TIR and its schedules (this
one included), so a carried CUDA source made from an older definition is never used: it is part
of the key under which the source is recorded (pigeon/runtime/shiftadd_kernel.py)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from . import tvm_add, tvm_hamming, tvm_shift

KINDS = ("shift_int", "shift_f32", "hamming", "accumulate")
_FILES = ("tvm_kernels.py", "tvm_tiles.py", "tvm_shift.py", "tvm_hamming.py", "tvm_add.py")

# the kernel's parameters as TVM writes them (buffers as <name>_ptr, then the shape variables,
# sorted by name): checked against the generated signature, so a TVM that orders them otherwise
# is an error, not a wrong launch
PARAMS = {
    "shift_int": (("out", "int32"), ("w", "int32"), ("x", "int32"), "K", "M", "N"),
    "shift_f32": (("out", "float32"), ("w", "int32"), ("x", "float32"), "K", "M", "N"),
    "hamming": (("k", "int32"), ("out", "int32"), ("q", "int32"), "Tk", "Tq", "W", "nbits"),
    "accumulate": (("codes", "int32"), ("out", "float32"), ("v", "float32"), "G", "Nv", "T", "W", "nbits"),
}


def definition_digest() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in _FILES:
        h.update(name.encode())
        h.update((here / name).read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class TvmKernel:
    kind: str
    p_min: int = 0
    p_max: int = 0
    bits: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TvmKernel: kind is one of {KINDS}, got {self.kind!r}")
        shift = self.kind.startswith("shift")
        if shift:
            lo = -30 if self.kind == "shift_int" else -126
            if not (isinstance(self.p_min, int) and isinstance(self.p_max, int) and lo <= self.p_min <= self.p_max <= 0):
                raise ValueError(f"TvmKernel {self.kind}: shift range {self.p_min}..{self.p_max} outside {lo}..0")
            if self.bits not in (5, 6) or self.p_max - self.p_min + 1 > (1 << (self.bits - 1)) - 1:
                raise ValueError(f"TvmKernel {self.kind}: range {self.p_min}..{self.p_max} does not fit "
                                 f"{self.bits}-bit codes")
        elif (self.p_min, self.p_max, self.bits) != (0, 0, 0):
            raise ValueError(f"TvmKernel {self.kind}: takes no shift range")

    @property
    def symbol(self) -> str:
        """The TIR function's global symbol (unique per kernel, so one cubin per kernel)."""
        base = {"shift_int": tvm_shift.NAME, "shift_f32": tvm_shift.NAME_F32, "hamming": tvm_hamming.NAME,
                "accumulate": tvm_add.NAME}[self.kind]
        if self.kind.startswith("shift"):
            base += f"_p{-self.p_min}_{-self.p_max}_b{self.bits}"
        return base

    @property
    def kernel_name(self) -> str:
        """The CUDA kernel's name in the generated source (TVM appends ``_kernel``)."""
        return self.symbol + "_kernel"

    def launch_dims(self, sizes: dict) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """``(grid, block)`` of the kernel's schedule for the launch's shape variables ``sizes``: the
        kernels are 2-d tiled (tvm_shift / tvm_hamming / tvm_add ``launch_dims``)."""
        if self.kind.startswith("shift"):
            return tvm_shift.launch_dims(sizes["M"], sizes["N"])
        if self.kind == "hamming":
            return tvm_hamming.launch_dims(sizes["Tq"], sizes["Tk"])
        return tvm_add.launch_dims(sizes["G"], sizes["nbits"], sizes["Nv"])

    @property
    def block(self) -> tuple[int, int, int]:
        """Threads per block (the same for every launch of the kernel)."""
        return self.launch_dims({"M": 1, "N": 1, "Tq": 1, "Tk": 1, "G": 1, "nbits": 1, "Nv": 1})[1]

    def describe(self) -> dict:
        return {"kind": self.kind, "p_min": self.p_min, "p_max": self.p_max, "bits": self.bits,
                "symbol": self.symbol}

    def key_text(self) -> str:
        return json.dumps(self.describe(), sort_keys=True)

    def primfunc(self, target: str):
        """The unscheduled TIR for ``target`` ("llvm" or "cuda": the Hamming popcount differs)."""
        if self.kind == "shift_int":
            return tvm_shift.shift_linear_primfunc(self.p_min, self.p_max, self.bits, name=self.symbol)
        if self.kind == "shift_f32":
            return tvm_shift.shift_linear_f32_primfunc(self.p_min, self.p_max, self.bits, name=self.symbol)
        if self.kind == "hamming":
            return tvm_hamming.hamming_primfunc(target, name=self.symbol)
        return tvm_add.code_accumulate_primfunc(name=self.symbol)

    def scheduled(self, target):
        """The scheduled IRModule for a tvm Target (needs TVM)."""
        kind = target.kind.name if hasattr(target, "kind") else str(target).split()[0]
        mod = {"hamming": tvm_hamming, "accumulate": tvm_add}.get(self.kind, tvm_shift)
        return mod.scheduled_module(self.primfunc("cuda" if kind == "cuda" else "llvm"), target)
