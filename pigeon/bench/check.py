"""The check of each case: pigeon's layer against the reference interpreter in float32, with the same
weights (rounded to the layer's dtype) and the same inputs."""
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


def check(layer, model: str, graph, dim: int, x, mode: str, dtype: str) -> str:
    """"ok", or "FAILED: why": pigeon's ``layer`` against the float32 reference interpreter with the
    same weights (rounded to the layer's dtype) and inputs; in training also the gradients of the
    loss with respect to the input and every weight."""
    device = x.device
    tdt = getattr(torch, dtype)
    ref = pg.compile(MODELS[model], graph, dim, backend="reference", dtype="float32", **hparams(model, dim))
    ref.weights.load_state_dict({k: v.detach().to(tdt).float() for k, v in layer.weights.state_dict().items()})
    ref = ref.to(device)
    problems = []
    if mode == "inference":
        with torch.no_grad():
            got, want = _outputs(layer(x)), _outputs(ref(x.float()))
        pairs = [(k, got.get(k), want[k]) for k in want]
    else:
        layer.zero_grad(set_to_none=True)
        xa = x.detach().clone().requires_grad_(True)
        xb = x.detach().float().clone().requires_grad_(True)
        got, want = _outputs(layer(xa)), _outputs(ref(xb))
        loss_of(got).backward()
        loss_of(want).backward()
        pairs = [(k, got.get(k), want[k]) for k in want] + [("grad x", xa.grad, xb.grad)]
        pairs += [(f"grad {k}", layer.weights[k].grad, ref.weights[k].grad) for k in ref.weights]
        layer.zero_grad(set_to_none=True)
    for name, a, b in pairs:
        why = _close(name, a, b, dtype)
        if why:
            problems.append(why)
    del ref
    return "ok" if not problems else "FAILED: " + one_line(" | ".join(problems), 400)
