"""Texts made by tracing user functions (GEMM epilogues, attention score/mask modifiers), kept per
(function identity, sizes) so that a steady-state call does not trace again.

Why.  Tracing a function into the expression IR and serializing the kernel instance costs 100 us
to 1 ms of host time per call (measured on the CPU machine: 160 us for a dense attention instance,
750 us with a causal mask expression), as much as the kernels of a small call.  A function is
identified by its code and by every value it can read: closure cells, defaults, keyword defaults
and the module globals its code (and its nested functions' code) names.  So a lambda re-created at
every call hits, and one whose captured scale changed misses.  A function that reads anything but
numbers, strings, None, functions (keyed the same way, to depth 4), builtins, classes and the
modules of pigeon, math, torch, operator and numpy has no key and is traced at every call: a
tensor or a mutable object could change without its key changing.
"""
from __future__ import annotations

import functools
import threading
import types
from typing import Callable, Hashable

import torch

_PLAIN = (int, float, bool, str, bytes, type(None))
_STABLE_MODULES = ("pigeon", "math", "torch", "operator", "numpy")
MAX_TEXTS = 1024


def _value_key(v, depth: int):
    if isinstance(v, float):
        return (float, repr(v))      # repr: -0.0 and 0.0 (equal as floats) trace differently
    if isinstance(v, _PLAIN):
        return (type(v), v)
    if isinstance(v, types.FunctionType):
        return ("fn", _function_key(v, depth + 1))     # a helper the function calls: its values count too
    if isinstance(v, (types.BuiltinFunctionType, type)):
        return ("id", id(v))
    if isinstance(v, types.ModuleType) and v.__name__.split(".")[0] in _STABLE_MODULES:
        return ("id", id(v))        # pigeon's activations, math: their attributes do not change
    raise TypeError


def _function_key(fn, depth: int = 0):
    if depth > 4:
        raise TypeError
    code = fn.__code__
    cells = tuple(_value_key(c.cell_contents, depth) for c in (fn.__closure__ or ()))
    defaults = tuple(_value_key(d, depth) for d in (fn.__defaults__ or ()))
    kwdefaults = tuple(sorted((k, _value_key(v, depth)) for k, v in (fn.__kwdefaults__ or {}).items()))
    g = fn.__globals__
    globs = tuple((n, _value_key(g[n], depth)) for n in _global_names(code) if n in g)
    return code, cells, defaults, kwdefaults, globs


def function_key(fn):
    """A hashable key under which ``fn``'s trace may be reused (``()`` for None), or None when it
    must be traced at every call."""
    if fn is None:
        return ()
    if not isinstance(fn, types.FunctionType):
        return None
    try:
        return _function_key(fn)
    except (TypeError, ValueError):       # a value of another kind, or an empty cell
        return None


@functools.lru_cache(maxsize=1024)
def _global_names(code) -> tuple:
    """Names a function's code (and its nested functions') may read as globals."""
    names = set(code.co_names)
    for c in code.co_consts:
        if hasattr(c, "co_names"):
            names.update(_global_names(c))
    return tuple(sorted(names))


_TEXTS: dict = {}
_lock = threading.Lock()


def cached_text(kind: str, fns: tuple, make: Callable[[], str], *sizes: Hashable) -> str:
    """``make()``, kept under (kind, the functions' keys, sizes); made afresh under torch.compile's
    tracing (dynamo runs the callers once, as constants) and for a function without a key."""
    if torch.compiler.is_compiling():
        return make()
    keys = []
    for fn in fns:
        k = function_key(fn)
        if k is None:
            return make()
        keys.append(k)
    key = (kind, tuple(keys)) + sizes
    text = _TEXTS.get(key)
    if text is None:
        text = make()
        with _lock:
            if len(_TEXTS) >= MAX_TEXTS:
                _TEXTS.clear()
            _TEXTS[key] = text
    return text


def cached_count() -> int:
    return len(_TEXTS)
