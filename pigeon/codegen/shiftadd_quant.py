"""Per-row float8_e4m3fn quantization of the fp8 shift path (``shiftadd.quant.cu.jinja``): config -> CUDA source.

One launch reads x [M, K] (bf16/fp16/fp32), writes the e4m3 codes [M, K] and the float32 row scales
[M] with the semantics of pigeon/shiftadd/fp8.py's torch form (``quantize_rows_e4m3_ref``; the
template's head says how).  :func:`config_for` picks the config of a call: ``tpr`` = 32 threads per
row (8 rows per 256-thread block) for K <= 2048, else 128 (2 rows per block).  The launch
(pigeon/runtime/shiftadd_kernel.py ``quantize_rows_e4m3``): ``grid = ceil(M / rows)`` blocks of 256
threads.  No torch here."""
from __future__ import annotations

from dataclasses import dataclass

from .expr_c import storage_type
from .jinja import render
from .kernel_source import DTYPE_TAG, KernelParam, RenderedKernel

TEMPLATE = "shiftadd.quant.cu.jinja"
DTYPES = ("bfloat16", "float16", "float32")
TPRS = (32, 128)
BLOCK = 256
WIDE_K = 2048          # K above this: 128 threads per row


class QuantConfigError(ValueError):
    pass


@dataclass(frozen=True)
class QuantConfig:
    dtype: str
    tpr: int
    block: int = BLOCK

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise QuantConfigError(f"e4m3 row quantization kernel: dtype is one of {DTYPES}, got {self.dtype!r}")
        if self.tpr not in TPRS or self.block != BLOCK:
            raise QuantConfigError(f"e4m3 row quantization kernel: tpr is one of {TPRS} and block {BLOCK}, "
                                   f"got {self.tpr}, {self.block}")

    @property
    def rows(self) -> int:
        return self.block // self.tpr

    @property
    def name(self) -> str:
        short = DTYPE_TAG[self.dtype]
        return f"pigeon_quant_rows_e4m3_{short}_t{self.tpr}"


def config_for(k: int, dtype: str) -> QuantConfig:
    return QuantConfig(dtype, 32 if k <= WIDE_K else 128)


def params(cfg: QuantConfig) -> tuple[KernelParam, ...]:
    t = storage_type(cfg.dtype)
    return (KernelParam("q", "ptr", "unsigned char* __restrict__", "buffer:q"),
            KernelParam("scale", "ptr", "float* __restrict__", "buffer:scale"),
            KernelParam("x", "ptr", f"const {t}* __restrict__", "buffer:x"),
            KernelParam("M", "int32", "int", "size:M"),
            KernelParam("K", "int32", "int", "size:K"),
            KernelParam("ldx", "int32", "int", "size:ldx"),
            KernelParam("ldq", "int32", "int", "size:ldq"))


def render_quant(cfg: QuantConfig) -> RenderedKernel:
    ps = params(cfg)
    source = render(TEMPLATE, cfg, name=cfg.name, signature=", ".join(p.c for p in ps))
    rows = cfg.rows
    return RenderedKernel(name=cfg.name, source=source, params=ps, block=(cfg.block, 1, 1),
                          grid=lambda m: (max(1, -(-int(m) // rows)), 1, 1), template=TEMPLATE,
                          meta={"config": cfg.__dict__.copy()})


def prebuild_configs() -> list[QuantConfig]:
    """Every config: the three dtypes, both row widths."""
    return [QuantConfig(d, t) for d in DTYPES for t in TPRS]
