"""The check of each case: pigeon's layer against the reference interpreter in float32, with the same
weights (rounded to the layer's dtype) and the same inputs; what misses the tolerance goes to the
float64 arbiter, whose baseline is the reference interpreter in the case's own dtype."""
from __future__ import annotations

import torch

import pigeon as pg
from pigeon.models import MODELS

from .floors import hparams
from .timing import loss_of, one_line

__all__ = ["check", "TOLERANCE"]

# pigeon vs the float32 reference: ok when |got - want| <= atol * max|want| + rtol * |want| elementwise
TOLERANCE = {"float32": (1e-4, 1e-4), "bfloat16": (4e-2, 4e-2)}          # dtype -> (rtol, atol)


def _outputs(out) -> dict:
    return out if isinstance(out, dict) else {"out": out}


def _close(name: str, got, want, dtype: str) -> str | None:
    """None when ``got`` matches ``want`` within the dtype's tolerance, else a one-line reason."""
    if got is None or want is None:
        return None if got is None and want is None else f"{name}: {'pigeon' if got is None else 'reference'} has none"
    got, want = got.detach().float(), want.detach().float()
    if got.shape != want.shape:
        return f"{name}: shape {list(got.shape)} != reference {list(want.shape)}"
    rtol, atol = TOLERANCE[dtype]
    scale = float(want.abs().max()) if want.numel() else 0.0
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale + 1e-30)
    except AssertionError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith(("Mismatched", "Greatest"))]
        return f"{name}: " + "; ".join(lines or [one_line(e)]) + f" (max|ref| {scale:.3g})"
    return None


ARBITER_FACTOR = 2.0       # pigeon may be at most this many times farther from float64 than the fp32 reference


def arbitrate(got, want32, want64, ref_name: str = "float32 reference") -> tuple[bool, str]:
    """Whether ``got`` is as close to the float64 truth ``want64`` as the reference ``want32`` (the
    reference interpreter in the case's dtype) is, within ARBITER_FACTOR, and the numbers.  Long
    reductions (a gradient summed over 21M edges in a different order) legitimately miss a fixed
    tolerance; this asks the question that matters instead: is pigeon's rounding worse than the
    reference's own?"""
    got, want32, want64 = (t.detach().double() for t in (got, want32, want64))
    err_pigeon = float((got - want64).abs().max()) if got.numel() else 0.0
    err_ref = float((want32 - want64).abs().max()) if got.numel() else 0.0
    floor = 1e-7 * float(want64.abs().max()) if got.numel() else 0.0     # float32 ulp scale
    ok = bool(torch.isfinite(got).all()) and err_pigeon <= ARBITER_FACTOR * err_ref + floor
    return ok, f"max err vs float64: pigeon {err_pigeon:.3g}, {ref_name} {err_ref:.3g}"


def _reference(model, graph, dim, layer, dtype: str, ref_dtype: str, device):
    tdt = getattr(torch, dtype)
    ref = pg.compile(MODELS[model], graph, dim, backend="reference", dtype=ref_dtype, **hparams(model, dim))
    ref.weights.load_state_dict({k: v.detach().to(tdt).to(getattr(torch, ref_dtype))
                                 for k, v in layer.weights.state_dict().items()})
    return ref.to(device)


def _values(module, x, mode: str, dtype) -> dict:
    """The outputs of ``module`` on ``x`` (cast to ``dtype``) and, in training, the gradients of the
    loss with respect to the input and every weight."""
    if mode == "inference":
        with torch.no_grad():
            return _outputs(module(x.to(dtype)))
    module.zero_grad(set_to_none=True)
    xi = x.detach().to(dtype).clone().requires_grad_(True)
    with torch.enable_grad():                # whatever grad mode the caller is in
        out = _outputs(module(xi))
        loss_of(out).backward()
    vals = {k: v.detach() for k, v in out.items()}
    vals["grad x"] = xi.grad
    vals.update({f"grad {k}": module.weights[k].grad for k in module.weights})
    module.zero_grad(set_to_none=True)
    return vals


def check(layer, model: str, graph, dim: int, x, mode: str, dtype: str) -> str:
    """"ok", or "FAILED: why": pigeon's ``layer`` against the float32 reference interpreter with the
    same weights (rounded to the layer's dtype) and inputs; in training also the gradients of the
    loss with respect to the input and every weight."""
    device = x.device
    ref = _reference(model, graph, dim, layer, dtype, "float32", device)
    want = _values(ref, x, mode, torch.float32)
    got = _values(layer, x, mode, x.dtype)
    pairs = [(k, got.get(k), w) for k, w in want.items()]
    failed = {}
    for name, a, b in pairs:
        why = _close(name, a, b, dtype)
        if why:
            failed[name] = (why, a, b)
    del ref
    notes = []
    if failed:
        # the float64 arbiter (see arbitrate): the same reference in float64, same weights and input.
        # Its baseline is the reference in the case's own dtype: the float32 reference for float32; for a
        # 16-bit case the reference interpreter in that dtype (rounding at every op as pigeon's buffers
        # do), so a sum that cancels (a bias gradient over millions of rows) is judged against what that
        # dtype can do, not against float32 (AM-sized RGCN bf16 training, 2026-12-02)
        ref64 = _reference(model, graph, dim, layer, dtype, "float64", device)
        truth = _values(ref64, x, mode, torch.float64)
        del ref64
        if dtype == "float32":
            base = {name: b for name, (_, _, b) in failed.items()}
        else:
            ref16 = _reference(model, graph, dim, layer, dtype, dtype, device)
            base = _values(ref16, x, mode, getattr(torch, dtype))
            del ref16
        for name in list(failed):
            why, a, b = failed[name]
            if name in truth and a is not None and base.get(name) is not None:
                ok, numbers = arbitrate(a, base[name], truth[name], f"{dtype} reference")
                if ok:
                    del failed[name]
                    notes.append(f"{name}: {numbers}")
                else:
                    failed[name] = (f"{why}; {numbers}", a, b)
    problems = [why for why, _, _ in failed.values()]
    if not problems:
        return "ok" if not notes else "ok (float64 arbiter: " + one_line("; ".join(notes), 300) + ")"
    return "FAILED: " + one_line(" | ".join(problems), 400)
