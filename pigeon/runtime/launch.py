"""Load cubins and launch their kernels through the CUDA driver API (``cuda.bindings.driver``).

Modules are loaded into the device's *primary* context, the one PyTorch's runtime uses, so kernels
launched here see torch's allocations and run on torch's streams (the current stream by default).
``cuda.bindings`` and torch's CUDA state are touched only when a module is loaded, so this module
imports on machines with neither a GPU nor cuda-python.

    mod = load_module(entry.read_cubin())            # cached per (cubin sha256, device)
    saxpy = mod.function("saxpy")
    saxpy.launch(grid=(blocks,), block=(256,), args=[y, x, 2.0, n], types=["ptr", "ptr", "float32", "int32"])

Set ``PIGEON_SYNC_LAUNCH=1`` to synchronize the stream after every launch and report asynchronous
errors (illegal address, ...) at the launch that caused them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import struct
import threading
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "CudaDriverError",
    "KernelLaunchError",
    "CudaModule",
    "CudaFunction",
    "load_module",
    "clear_module_cache",
    "sync_launch_enabled",
    "keep_launch_args",
    "C_TYPES",
]

_DEFAULT_MAX_DYNAMIC_SMEM = 48 * 1024


class CudaDriverError(RuntimeError):
    """A CUDA driver call failed (module load, function lookup, context setup)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class KernelLaunchError(CudaDriverError):
    """A kernel launch failed; the message names the kernel, grid, block and CUDA error."""


# ---------------------------------------------------------------------------- driver access

_drv = None


def _driver():
    global _drv
    if _drv is None:
        try:
            from cuda.bindings import driver  # noqa: PLC0415
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise CudaDriverError(
                "pigeon.runtime.launch needs cuda-python's driver bindings (pip install cuda-bindings); "
                f"importing cuda.bindings.driver failed: {e}"
            ) from e
        _drv = driver
    return _drv


def _error_string(err: Any) -> str:
    drv = _driver()
    try:
        _, name = drv.cuGetErrorName(err)
        _, desc = drv.cuGetErrorString(err)
        name = name.decode() if isinstance(name, bytes) else str(name)
        desc = desc.decode() if isinstance(desc, bytes) else str(desc)
        return f"{name} ({int(err)}): {desc}"
    except Exception:
        return str(err)


def _ok(err: Any) -> bool:
    return int(err) == 0


def _check(result: Any, what: str) -> Any:
    """Unpack a cuda.bindings result tuple, raising CudaDriverError when its CUresult is not success."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if not _ok(err):
        raise CudaDriverError(f"{what} failed: {_error_string(err)}", code=int(err))
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def sync_launch_enabled() -> bool:
    v = os.environ.get("PIGEON_SYNC_LAUNCH")
    return bool(v) and v.strip().lower() not in ("", "0", "false", "no", "off")


_keep = threading.local()


@contextlib.contextmanager
def keep_launch_args():
    """Collect, while the block runs, every tensor that a kernel launched on this thread receives.
    A CUDA-graph capture (pigeon/runtime/replay.py) keeps them: the graph reads their memory at
    every replay, so none may be freed (and reused) while the graph lives."""
    prev = getattr(_keep, "tensors", None)
    kept: list = []
    _keep.tensors = kept
    try:
        yield kept
    finally:
        _keep.tensors = prev


_lock = threading.RLock()
_initialized = False
_primary: dict[int, tuple[Any, int]] = {}  # device ordinal -> (retained primary CUcontext, its address)


def _torch():
    import torch  # noqa: PLC0415

    return torch


def _device_index(device: Any) -> int:
    torch = _torch()
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"not a CUDA device: {device!r}")
    return dev.index if dev.index is not None else torch.cuda.current_device()


def _primary_context(device: int) -> tuple[Any, int]:
    """Retain (once) the primary context of ``device``, the one torch's runtime uses."""
    global _initialized
    drv = _driver()
    with _lock:
        if not _initialized:
            torch = _torch()
            torch.cuda.init()
            torch.cuda.current_device()
            _check(drv.cuInit(0), "cuInit")
            _initialized = True
        entry = _primary.get(device)
        if entry is None:
            cudev = _check(drv.cuDeviceGet(device), f"cuDeviceGet({device})")
            ctx = _check(drv.cuDevicePrimaryCtxRetain(cudev), f"cuDevicePrimaryCtxRetain({device})")
            entry = _primary[device] = (ctx, int(ctx))
    return entry


def _make_current(device: int) -> Any:
    """Make ``device``'s primary context current on this thread (if it is not) and return it."""
    entry = _primary.get(device) or _primary_context(device)
    drv = _driver()
    err, cur = drv.cuCtxGetCurrent()
    if not _ok(err) or cur is None or int(cur) != entry[1]:
        _check(drv.cuCtxSetCurrent(entry[0]), f"cuCtxSetCurrent(device {device})")
    return entry[0]


# ---------------------------------------------------------------------------- argument packing


def _f16_bits(v: float) -> int:
    return struct.unpack("<H", struct.pack("<e", v))[0]


def _bf16_bits(v: float) -> int:
    bits = struct.unpack("<I", struct.pack("<f", v))[0]
    if (bits & 0x7F800000) == 0x7F800000 and (bits & 0x007FFFFF):  # NaN: keep it a NaN
        return ((bits >> 16) | 0x40) & 0xFFFF
    bits += 0x7FFF + ((bits >> 16) & 1)  # round to nearest even
    return (bits >> 16) & 0xFFFF


# C type name -> (ctypes type, converter from a Python value)
C_TYPES: dict[str, tuple[type, Any]] = {
    "ptr": (ctypes.c_uint64, int),
    "int8": (ctypes.c_int8, int),
    "uint8": (ctypes.c_uint8, int),
    "int16": (ctypes.c_int16, int),
    "uint16": (ctypes.c_uint16, int),
    "int32": (ctypes.c_int32, int),
    "uint32": (ctypes.c_uint32, int),
    "int64": (ctypes.c_int64, int),
    "uint64": (ctypes.c_uint64, int),
    "bool": (ctypes.c_uint8, lambda v: 1 if v else 0),
    "float16": (ctypes.c_uint16, _f16_bits),
    "bfloat16": (ctypes.c_uint16, _bf16_bits),
    "float32": (ctypes.c_float, float),
    "float64": (ctypes.c_double, float),
}
_ALIASES = {
    "int": "int32", "i32": "int32", "i64": "int64", "u32": "uint32", "u64": "uint64",
    "unsigned": "uint32", "long": "int64", "size_t": "uint64", "float": "float32",
    "f32": "float32", "double": "float64", "f64": "float64", "half": "float16", "f16": "float16",
    "bf16": "bfloat16", "pointer": "ptr", "void*": "ptr",
}
_INFER_BY_SIZE = {(int, 4): "int32", (int, 8): "int64", (float, 4): "float32", (float, 8): "float64"}


def _canon_type(t: str) -> str:
    t = _ALIASES.get(t, t)
    if t not in C_TYPES:
        raise TypeError(f"unknown C type {t!r}; known: {sorted(C_TYPES)} (and aliases {sorted(_ALIASES)})")
    return t


def _dims(x: Any, what: str) -> tuple[int, int, int]:
    if type(x) is int and x >= 1:
        return (x, 1, 1)
    if type(x) is tuple and len(x) == 3 and all(type(v) is int and v >= 1 for v in x):
        return x  # type: ignore[return-value]
    if isinstance(x, int):
        x = (x,)
    x = tuple(int(v) for v in x)
    if not 1 <= len(x) <= 3 or any(v < 1 for v in x):
        raise ValueError(f"{what} must be 1-3 positive ints, got {x}")
    return (x + (1, 1))[:3]  # type: ignore[return-value]


@functools.lru_cache(maxsize=1024)
def _canon_types(types: tuple[str | None, ...]) -> tuple[str | None, ...]:
    return tuple(_canon_type(t) if t is not None else None for t in types)


@functools.lru_cache(maxsize=None)
def _ptr_array(n: int) -> type:
    return ctypes.c_void_p * n


def _current_stream(device: int) -> int:
    """Raw handle of torch's current stream on ``device``."""
    torch = _torch()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what torch's own codegen calls
    if raw is not None:
        return int(raw(device))
    return int(torch.cuda.current_stream(device).cuda_stream)


# ---------------------------------------------------------------------------- module and function


class CudaModule:
    """A cubin loaded into the primary context of one CUDA device. Prefer :func:`load_module` (cached)."""

    def __init__(self, cubin: bytes, device: Any = None):
        cubin = bytes(cubin)
        self.device = _device_index(device)
        self.sha256 = hashlib.sha256(cubin).hexdigest()
        self._image = cubin  # the driver copies it, but keep it for inspection
        drv = _driver()
        _make_current(self.device)
        err, module = drv.cuModuleLoadData(cubin)
        if not _ok(err):
            hint = ""
            if int(err) == int(drv.CUresult.CUDA_ERROR_NO_BINARY_FOR_GPU):
                major, minor = _torch().cuda.get_device_capability(self.device)
                hint = f" (the device is sm_{major}{minor}: build the cubin for that arch)"
            raise CudaDriverError(
                f"cuModuleLoadData (cubin {self.sha256[:12]}, device {self.device}) failed: {_error_string(err)}{hint}",
                code=int(err),
            )
        self._module = module
        self._functions: dict[str, CudaFunction] = {}

    def function(self, name: str) -> "CudaFunction":
        fn = self._functions.get(name)
        if fn is None:
            drv = _driver()
            _make_current(self.device)
            err, handle = drv.cuModuleGetFunction(self._module, name.encode("utf-8"))
            if not _ok(err):
                raise CudaDriverError(
                    f"kernel {name!r} not found in cubin {self.sha256[:12]}: {_error_string(err)} "
                    "(is it declared extern \"C\"? otherwise use its mangled name)",
                    code=int(err),
                )
            fn = CudaFunction(self, name, handle)
            self._functions[name] = fn
        return fn

    __getitem__ = function

    def unload(self) -> None:
        """Unload from the driver. Functions obtained from this module must not be used afterwards."""
        if self._module is not None:
            _make_current(self.device)
            _check(_driver().cuModuleUnload(self._module), "cuModuleUnload")
            self._module = None
            self._functions.clear()

    def __repr__(self) -> str:
        return f"CudaModule(sha256={self.sha256[:12]}, device={self.device})"


class CudaFunction:
    """One kernel of a :class:`CudaModule`; call :meth:`launch`."""

    def __init__(self, module: CudaModule, name: str, handle: Any):
        self.module = module
        self.name = name
        self._handle = handle
        self._max_dynamic_smem = _DEFAULT_MAX_DYNAMIC_SMEM
        self._param_sizes: list[int] | None | bool = False  # False: not queried yet; None: unknown
        self._sizes_checked: set = set()          # types lists whose packed sizes matched the kernel's

    def __repr__(self) -> str:
        return f"CudaFunction({self.name!r}, {self.module!r})"

    def attribute(self, attr: str) -> int:
        """cuFuncGetAttribute by short name, e.g. "NUM_REGS", "SHARED_SIZE_BYTES", "MAX_THREADS_PER_BLOCK"."""
        drv = _driver()
        enum = getattr(drv.CUfunction_attribute, f"CU_FUNC_ATTRIBUTE_{attr.upper()}")
        return int(_check(drv.cuFuncGetAttribute(enum, self._handle), f"cuFuncGetAttribute({attr})"))

    def param_sizes(self) -> list[int] | None:
        """Sizes in bytes of the kernel's parameters (cuFuncGetParamInfo, CUDA >= 12.4), or None if unknown."""
        if self._param_sizes is False:
            drv = _driver()
            sizes: list[int] | None = []
            if not hasattr(drv, "cuFuncGetParamInfo"):
                sizes = None
            else:
                for i in range(4096):
                    try:
                        res = drv.cuFuncGetParamInfo(self._handle, i)
                    except Exception:
                        sizes = None
                        break
                    if not _ok(res[0]):
                        if int(res[0]) != int(drv.CUresult.CUDA_ERROR_INVALID_VALUE):
                            sizes = None  # e.g. not supported by this driver
                        break
                    sizes.append(int(res[2]))
            self._param_sizes = sizes
        return self._param_sizes  # type: ignore[return-value]

    def _pack(self, args: Sequence[Any], types: Sequence[str | None] | None, where: Any) -> list[Any]:
        """ctypes objects for ``args``; ``where()`` describes the launch in error messages."""
        tensor_type = _torch().Tensor
        dev = self.module.device
        n = len(args)
        if types is not None:
            if len(types) != n:
                raise TypeError(f"{where()}: {n} args but {len(types)} types")
            ctypes_list = _canon_types(tuple(types))
        else:
            ctypes_list = (None,) * n
        sizes = self.param_sizes()
        if sizes is not None and len(sizes) != n:
            raise TypeError(f"{where()}: the kernel takes {len(sizes)} parameters (sizes {sizes}), got {n} args")
        out = []
        for i, a in enumerate(args):
            t = ctypes_list[i]
            if isinstance(a, tensor_type):
                if t is not None and t != "ptr":
                    raise TypeError(f"{where()}: arg {i} is a tensor but its type is {t!r}")
                if not a.is_cuda or a.get_device() != dev:
                    raise ValueError(f"{where()}: arg {i} is on {a.device}, the kernel runs on cuda:{dev}")
                out.append(ctypes.c_uint64(a.data_ptr()))
                continue
            if a is None:
                if t is not None and t != "ptr":
                    raise TypeError(f"{where()}: arg {i} is None but its type is {t!r}")
                out.append(ctypes.c_uint64(0))
                continue
            if hasattr(a, "data_ptr") and t in (None, "ptr"):
                value, t = int(a.data_ptr()), "ptr"
            else:
                value = a
            if t is None:
                if isinstance(a, bool) or not isinstance(a, (int, float)):
                    raise TypeError(f"{where()}: arg {i} ({type(a).__name__}) needs an explicit C type")
                kind = int if isinstance(a, int) else float
                t = _INFER_BY_SIZE.get((kind, sizes[i])) if sizes is not None else None
                if t is None:
                    raise TypeError(
                        f"{where()}: arg {i} ({a!r}) needs an explicit C type, e.g. types=[..., 'int32', ...]"
                    )
            ctype, conv = C_TYPES[t]
            try:
                obj = ctype(conv(value))
            except (TypeError, ValueError, OverflowError, struct.error) as e:
                raise TypeError(f"{where()}: arg {i} ({value!r}) is not a valid {t}: {e}") from e
            out.append(obj)
        # the packed sizes follow from the types alone: checked once per types list, not per launch
        checked = self._sizes_checked
        if sizes is not None and (types is None or ctypes_list not in checked):
            for i, obj in enumerate(out):
                if ctypes.sizeof(obj) != sizes[i]:
                    raise TypeError(
                        f"{where()}: arg {i} packed as {ctypes_list[i] or 'ptr'} ({ctypes.sizeof(obj)} bytes) but "
                        f"the kernel's parameter {i} has {sizes[i]} bytes"
                    )
            if types is not None and None not in ctypes_list:
                checked.add(ctypes_list)
        return out

    def launch(
        self,
        grid: int | Sequence[int],
        block: int | Sequence[int],
        args: Sequence[Any],
        types: Sequence[str | None] | None = None,
        *,
        shared_mem: int = 0,
        stream: Any = None,
    ) -> None:
        """Launch on ``stream`` (default: torch's current stream of the module's device).

        ``args``: torch tensors (passed as their data pointer), None (null pointer), Python ints/floats.
        ``types``: optional parallel list of C type names ("ptr", "int32", "int64", "float32",
        "float16", "bfloat16", ... see ``C_TYPES``); a scalar without a type is accepted only when the
        driver reports the parameter's size (int -> int32/int64, float -> float32/float64).
        ``shared_mem``: dynamic shared memory bytes; above 48 KiB the function's
        MAX_DYNAMIC_SHARED_SIZE_BYTES attribute is raised first.
        ``stream``: a torch.cuda.Stream, anything with ``.cuda_stream``, or a raw CUstream handle (int).
        """
        drv = _driver()
        g, b = _dims(grid, "grid"), _dims(block, "block")
        shared_mem = int(shared_mem)

        def where() -> str:
            return f"kernel {self.name!r} grid={g} block={b} smem={shared_mem}"

        params = self._pack(args, types, where)
        kept = getattr(_keep, "tensors", None)
        if kept is not None:
            tensor_type = _torch().Tensor
            kept.extend(a for a in args if isinstance(a, tensor_type))
        if self.module._module is None:
            raise KernelLaunchError(f"{where()}: its module was unloaded")
        dev = self.module.device
        _make_current(dev)

        if stream is None:
            stream_handle = _current_stream(dev)
        elif hasattr(stream, "cuda_stream"):
            stream_handle = int(stream.cuda_stream)
        else:
            stream_handle = int(stream)

        if shared_mem > self._max_dynamic_smem:
            err = drv.cuFuncSetAttribute(
                self._handle,
                drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared_mem,
            )[0]
            if not _ok(err):
                raise KernelLaunchError(
                    f"{where()}: setting MAX_DYNAMIC_SHARED_SIZE_BYTES={shared_mem} failed: {_error_string(err)} "
                    "(more dynamic shared memory than the device allows per block, with the static part?)",
                    code=int(err),
                )
            self._max_dynamic_smem = shared_mem

        n = len(params)
        ptrs = _ptr_array(n)(*[ctypes.addressof(p) for p in params]) if n else None
        err = drv.cuLaunchKernel(
            self._handle,
            g[0], g[1], g[2],
            b[0], b[1], b[2],
            shared_mem,
            stream_handle,
            ctypes.addressof(ptrs) if n else 0,
            0,
        )[0]
        if not _ok(err):
            raise KernelLaunchError(f"{where()}: cuLaunchKernel failed: {_error_string(err)}", code=int(err))
        if sync_launch_enabled():
            err = drv.cuStreamSynchronize(stream_handle)[0]
            if not _ok(err):
                raise KernelLaunchError(
                    f"{where()}: kernel failed (PIGEON_SYNC_LAUNCH): {_error_string(err)}", code=int(err)
                )
        del ptrs, params  # kept alive until here: the driver reads them during cuLaunchKernel

    __call__ = launch


# ---------------------------------------------------------------------------- module cache

_modules: dict[tuple[str, int], CudaModule] = {}


def load_module(cubin: Any, device: Any = None) -> CudaModule:
    """A :class:`CudaModule` for ``cubin``, loaded once per (sha256, device) in this process.

    ``cubin``: bytes, a path to a .cubin file, or a cache entry (anything with ``read_cubin()``).
    """
    if hasattr(cubin, "read_cubin"):
        data = cubin.read_cubin()
    elif isinstance(cubin, (str, os.PathLike)):
        data = Path(cubin).read_bytes()
    else:
        data = bytes(cubin)
    dev = _device_index(device)
    key = (hashlib.sha256(data).hexdigest(), dev)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            mod = CudaModule(data, dev)
            _modules[key] = mod
    return mod


def clear_module_cache(unload: bool = True) -> None:
    """Forget (and by default unload) every module loaded through :func:`load_module`."""
    with _lock:
        mods = list(_modules.values())
        _modules.clear()
    if unload:
        for m in mods:
            m.unload()
