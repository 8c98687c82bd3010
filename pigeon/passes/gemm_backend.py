"""Which library or code generator runs each dense GEMM launch: cuBLAS (``torch.mm``), pigeon's
GEMM template, or TVM's dlight Matmul rule (pigeon/codegen/tvm_gemm.py).  One decision point per
dense GEMM shape of a program pair: ``gemm:<rows>/k<K>n<N>/<N|T|dW>`` (``T``: the transposed weight
of a data gradient, ``dW``: the weight gradient ``X^T dY``).

A GEMM is dense when ``GemmInstance.not_dense()`` is None: untyped, no gather, scatter, heads,
epilogue or accumulation (RGCN's root weight ``x @ W_self``, its data gradient ``dy @ W_self^T``
and its weight gradient).  Options: ``cublas`` and ``template`` for both forms, ``tvm`` for the
rows form.  The rule picks cuBLAS: at the widths RGNN layers have (k, n <= 128) these GEMMs are
memory-bound; at 1.7-1.9M rows on the H200 cuBLAS moved 3.2-3.9 TB/s in bf16 where the template
moved 0.6-2.2 (cuBLAS 1.5-5.5x faster) and TVM's kernel 0.3-0.6, and in float32 cuBLAS was within
0.92-1.36x of the template (benchmarks/results/dense_gemm_h200_b294585).  Nothing
is hand-written for the dense case that a library provides; the TVM kernel is a candidate
``--tune`` measures on the GPU.  On a CPU every option runs the instance's semantics.
``choose_gemm_backends`` applies the rule, or the given choices.  ``PIGEON_DENSE_GEMM=cublas|template|tvm``
forces a backend wherever it can run (TVM's: the rows form), leaving that point one option.
A 16-bit dense GEMM whose float32 rows only elementwise kernels read (``GemmInstance.y_dtype``, set by
pigeon/passes/lower.py) runs on cuBLAS only (point ``.../f32``): the template and TVM's kernel
store Y in the operands' dtype.
``PIGEON_TYPED_GEMM=cublas`` (``typed_forced``) sends typed single-head GEMMs to cuBLAS, one call per
type segment (family_gemm.run_cublas_segments): an experiment for the float32 cases, where the SIMT
template reached ~23 TFLOP/s of the 50 ceiling on the AM-sized graph at hidden 128. Measured there
(AM RGCN d128 fp32 inference, 133 relations, H200, 988c899): 1.42-1.48x slower than the template
(benchmarks/results/typed_gemm_ab_h200_988c899), so not a decision point.
"""
from __future__ import annotations

import dataclasses
import os

from ..ir.program import GemmLaunch, KernelProgram

BACKENDS = ("cublas", "template", "tvm")
RULE_PICK = "cublas"
RULE_WHY = ("rule: cuBLAS (memory-bound at these widths: 1.5-5.5x the template in bf16, 0.92-1.36x in float32, "
            "at 1.7-1.9M rows on the H200)")


ENV = "PIGEON_DENSE_GEMM"
TYPED_ENV = "PIGEON_TYPED_GEMM"   # cublas: typed single-head GEMMs one torch.mm per type segment


class GemmBackendError(ValueError):
    pass


def forced() -> str | None:
    """The backend ``PIGEON_DENSE_GEMM`` forces, or None (unset, empty or ``auto``)."""
    v = os.environ.get(ENV, "").strip().lower()
    if v in ("", "auto"):
        return None
    if v not in BACKENDS:
        raise GemmBackendError(f"{ENV}={v!r}: expected auto or one of {', '.join(BACKENDS)}")
    return v


def typed_forced() -> bool:
    """``PIGEON_TYPED_GEMM=cublas``: typed single-head GEMMs (no scatter, epilogue or accumulation) run
    as one cuBLAS call per type segment (family_gemm.run_cublas_segments) instead of the template.
    An A/B switch for measuring on the GPU, not a decision point: unset, ``auto`` or ``template``
    keep the template."""
    v = os.environ.get(TYPED_ENV, "").strip().lower()
    if v in ("", "auto", "template"):
        return False
    if v != "cublas":
        raise GemmBackendError(f"{TYPED_ENV}={v!r}: expected auto, template or cublas")
    return True


def pick(launch: GemmLaunch, f: str | None) -> str:
    """The rule's backend for a dense launch, or the forced one ``f`` (:func:`forced`) where it can run."""
    return f if f is not None and f in options(launch) else RULE_PICK


def gemm_form(inst) -> str:
    """``N`` (rows), ``T`` (rows with the transposed weight: a data gradient) or ``dW`` (weight_grad)."""
    return "dW" if inst.form == "weight_grad" else ("T" if inst.transpose_w else "N")


def gemm_point(launch) -> str | None:
    """The decision point of a launch, or None when only the template can run it."""
    if not isinstance(launch, GemmLaunch) or launch.inst.not_dense() is not None:
        return None
    i = launch.inst
    # a float32 Y of 16-bit operands has one option: its own point, not shared with a same-shape GEMM
    return f"gemm:{launch.rows}/k{i.k}n{i.n}/{gemm_form(i)}" + ("/f32" if i.y_dtype is not None else "")


def options(launch: GemmLaunch) -> tuple[str, ...]:
    """The backends that can run a dense launch (TVM's kernel: the rows form only; a float32 Y of
    16-bit operands, ``inst.y_dtype``: cuBLAS only)."""
    if launch.inst.y_dtype is not None:
        return ("cublas",)
    return BACKENDS if launch.inst.form == "rows" else ("cublas", "template")


def gemm_points(programs) -> list[tuple[str, tuple[str, ...], str]]:
    """``(point, options, why)`` of the dense GEMM launches of ``programs`` (None skipped), in order."""
    seen: dict[str, tuple] = {}
    f = forced()
    for prog in programs:
        for launch in (prog.launches if prog is not None else ()):
            name = gemm_point(launch)
            if name is not None and name not in seen:
                seen[name] = ((name, (f,), f"{ENV}={f}") if f is not None and f in options(launch)
                              else (name, options(launch), RULE_WHY))
    return list(seen.values())


def choose_gemm_backends(program: KernelProgram | None, choices: dict | None = None) -> KernelProgram | None:
    """The program with each dense GEMM launch given the backend ``choices`` names for its point, or
    the rule's (cuBLAS) where it names none."""
    if program is None:
        return None
    choices = choices or {}
    f = forced()
    typed = typed_forced()
    launches, changed = [], False
    for launch in program.launches:
        name = gemm_point(launch)
        if typed and isinstance(launch, GemmLaunch) and launch.backend != "cublas" \
                and launch.inst.not_segmented() is None:
            launch = dataclasses.replace(launch, backend="cublas")
            changed = True
        if name is not None:
            b = choices.get(name) or pick(launch, f)
            if b not in options(launch):
                raise GemmBackendError(f"{name}: backend {b!r}: expected one of {', '.join(options(launch))}")
            if b != launch.backend:
                launch = dataclasses.replace(launch, backend=b)
                changed = True
        launches.append(launch)
    return dataclasses.replace(program, launches=tuple(launches)) if changed else program
