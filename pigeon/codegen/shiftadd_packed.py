"""The weight-only packed shift linear (``shiftadd.packed.cu.jinja``): config -> CUDA source.

For 1-16 tokens the shift linear is a GEMV bound by the bytes of the weights: 5- or 6-bit codes
(quant.py's packed format) instead of 16-bit weights.  :func:`config_for` picks the config of a
call (the token bound ``mt`` among MT_STEPS, rows per warp from it), :func:`render_packed` renders
it.  The launch (pigeon/runtime/shiftadd_kernel.py ``packed_linear``): ``grid = ceil(N / (warps *
rows))`` blocks of ``warps * 32`` threads; ``w`` rows padded to ``ldw`` words, a multiple of 4
(quant.py ``pad_words``).  No torch here."""
from __future__ import annotations

from dataclasses import dataclass

from .expr_c import storage_type
from .jinja import render
from .kernel_source import DTYPE_TAG, KernelParam, RenderedKernel

TEMPLATE = "shiftadd.packed.cu.jinja"
DTYPES = ("bfloat16", "float16", "float32")
MT_STEPS = (1, 4, 8, 16)
MAX_TOKENS = MT_STEPS[-1]
WARPS = 4


class PackedConfigError(ValueError):
    pass


@dataclass(frozen=True)
class PackedConfig:
    dtype: str
    mt: int
    bits: int
    p_min: int
    p_max: int
    rows: int
    warps: int = WARPS

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise PackedConfigError(f"packed shift kernel: dtype is one of {DTYPES}, got {self.dtype!r}")
        if self.mt not in MT_STEPS:
            raise PackedConfigError(f"packed shift kernel: mt is one of {MT_STEPS}, got {self.mt!r}")
        if self.bits not in (5, 6) or not (-126 <= self.p_min <= self.p_max <= 0) or \
                self.p_max - self.p_min + 1 > (1 << (self.bits - 1)) - 1:
            raise PackedConfigError(f"packed shift kernel: range {self.p_min}..{self.p_max} with {self.bits}-bit "
                                    "codes is not a packed format (quant.py)")
        if self.rows not in (1, 2, 4, 8) or self.warps not in (1, 2, 4, 8):
            raise PackedConfigError(f"packed shift kernel: rows and warps are 1, 2, 4 or 8, got {self.rows}, {self.warps}")

    @property
    def per(self) -> int:
        return 32 // self.bits

    @property
    def rows_per_block(self) -> int:
        return self.rows * self.warps

    @property
    def smem(self) -> int:
        return self.mt * 32 * 4 * self.per * 4

    @property
    def name(self) -> str:
        short = DTYPE_TAG[self.dtype]
        return (f"pigeon_shift_packed_{short}_m{self.mt}_b{self.bits}_p{-self.p_min}_{-self.p_max}"
                f"_r{self.rows}_w{self.warps}")


def config_for(tokens: int, dtype: str, p_min: int, p_max: int, bits: int) -> PackedConfig:
    """The config of a call with ``tokens`` rows of x (1..MAX_TOKENS)."""
    if not isinstance(tokens, int) or not 1 <= tokens <= MAX_TOKENS:
        raise PackedConfigError(f"the packed shift kernel takes 1..{MAX_TOKENS} tokens, got {tokens!r} "
                                "(larger batches: the shift or fp8 path)")
    mt = next(s for s in MT_STEPS if s >= tokens)
    rows = 4 if mt == 1 else 2          # mt 4 with 4 rows spilled (ptxas, nvcc 13.0)
    return PackedConfig(dtype, mt, bits, p_min, p_max, rows, WARPS)


def params(cfg: PackedConfig) -> tuple[KernelParam, ...]:
    t = storage_type(cfg.dtype)
    return (KernelParam("out", "ptr", f"{t}* __restrict__", "buffer:out"),
            KernelParam("x", "ptr", f"const {t}* __restrict__", "buffer:x"),
            KernelParam("w", "ptr", "const int* __restrict__", "buffer:w"),
            KernelParam("bias", "ptr", "const float* __restrict__", "buffer:bias"),
            KernelParam("M", "int32", "int", "size:M"),
            KernelParam("N", "int32", "int", "size:N"),
            KernelParam("K", "int32", "int", "size:K"),
            KernelParam("ldx", "int32", "int", "size:ldx"),
            KernelParam("ldw", "int32", "int", "size:ldw"),
            KernelParam("ldo", "int32", "int", "size:ldo"))


def render_packed(cfg: PackedConfig) -> RenderedKernel:
    ps = params(cfg)
    sig = ", ".join(p.c for p in ps)
    source = render(TEMPLATE, cfg, name=cfg.name, signature=sig, per=cfg.per)
    rpb = cfg.rows_per_block
    return RenderedKernel(name=cfg.name, source=source, params=ps, block=(cfg.warps * 32, 1, 1),
                          grid=lambda n: (max(1, -(-int(n) // rpb)), 1, 1), template=TEMPLATE,
                          meta={"config": cfg.__dict__.copy()})


def prebuild_configs() -> list[PackedConfig]:
    """What the GPU tests and ``pigeon bench shiftadd`` launch: every token bound, the three dtypes,
    for the default 6-bit range -15..0; bf16 also with 5-bit codes (-14..0)."""
    out = [config_for(mt, dtype, -15, 0, 6) for dtype in DTYPES for mt in MT_STEPS]
    return out + [config_for(mt, "bfloat16", -14, 0, 5) for mt in MT_STEPS]
