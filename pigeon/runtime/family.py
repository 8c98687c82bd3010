"""The kernel-family registry: one ``KernelFamily`` record per family, registered once by the
family's own module (pigeon/runtime/family_<name>.py).  The executor, the AOT artifacts, the
serializer and the layer ops use only this registry, so a new family is one new module.

A family gives:

* ``launch_type``: its launch record in the program IR (pigeon/ir/program.py); ``launch.family``
  names the family, ``reads()`` / ``writes()`` the buffers;
* ``serial_types``: the classes its launches contain (registered with pigeon/ir/serialize.py);
* ``validate(launch)``: raise on an instance its code generator cannot handle;
* ``render(launch)``: its CUDA kernel (a ``RenderedKernel``), or None for host work;
* ``semantics(launch, kg, bufs)``: the oracle: writes the launch's outputs in ``bufs`` with torch;
* ``cuda(launch, kg, bufs, backend)``: runs the generated kernel (built into the disk cache, or
  taken from ``backend.modules``, which artifacts fill with their cubins);
* ``emulate(launch, kg, bufs)``: runs the same CUDA text on the CPU (None: not emulable; the
  semantics run instead).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..ir.serialize import register_serializable


class FamilyError(ValueError):
    pass


@dataclass(frozen=True)
class KernelFamily:
    name: str
    launch_type: type
    serial_types: tuple[type, ...]
    semantics: Callable[..., None]
    validate: Callable[[Any], None] = lambda launch: None
    render: Callable[[Any], Any] = lambda launch: None
    cuda: Callable[..., None] | None = None
    emulate: Callable[..., None] | None = None
    doc: str = ""


FAMILIES: dict[str, KernelFamily] = {}


def register_family(fam: KernelFamily, *, replace: bool = False) -> KernelFamily:
    if getattr(fam.launch_type, "family", None) != fam.name:
        raise FamilyError(f"family {fam.name!r}: its launch type {fam.launch_type.__name__} must declare "
                          f"family = {fam.name!r}")
    if fam.name in FAMILIES and not replace:
        raise FamilyError(f"kernel family {fam.name!r} is already registered")
    register_serializable(fam.launch_type, *fam.serial_types)
    FAMILIES[fam.name] = fam
    return fam


def unregister_family(name: str) -> None:
    FAMILIES.pop(name, None)


def family_of(launch: Any) -> KernelFamily:
    name = getattr(launch, "family", None)
    fam = FAMILIES.get(name)
    if fam is None:
        raise FamilyError(f"no kernel family {name!r} for launch {type(launch).__name__} "
                          f"(registered: {sorted(FAMILIES)})")
    return fam


def run_launch(backend: Any, launch: Any, kg: Any, bufs: Mapping[str, Any]) -> None:
    """Run one launch on an executor backend (``backend.name``: cuda, emulate or torch)."""
    fam = family_of(launch)
    name = getattr(backend, "name", "torch")
    if name == "cuda" and fam.cuda is not None:
        fam.cuda(launch, kg, bufs, backend)
    elif name == "emulate" and fam.emulate is not None:
        fam.emulate(launch, kg, bufs)
    else:
        fam.semantics(launch, kg, bufs)
