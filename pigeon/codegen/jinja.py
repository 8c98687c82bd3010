"""The Jinja2 environment of pigeon's CUDA templates (``pigeon/templates/<family>.<variant>.cu.jinja``).

Templates are read through :mod:`importlib.resources` from the ``templates`` folder of the
``pigeon`` package (so they load from a wheel or a zip as well as from a checkout). The
environment is strict: an undefined variable or attribute raises (``StrictUndefined``), nothing
is HTML-escaped, and block tags do not leave blank lines (``trim_blocks`` / ``lstrip_blocks``).

Every template takes one frozen config object, bound to ``c``; extra keyword arguments of
:func:`render` become further template variables. Filters for C code:

* ``ctype``   -- dtype name -> C storage type: ``'bfloat16' | ctype`` is ``__nv_bfloat16``;
* ``cfloat``  -- a Python number -> a C ``float`` literal equal to its float32 value;
* ``cbool``   -- truthiness -> ``true`` / ``false``;
* ``cident``  -- checks that a string is a C identifier (raises otherwise) and returns it.
"""
from __future__ import annotations

import ctypes as _ctypes
import functools
import math
import re
from importlib import resources
from typing import Any

import jinja2

__all__ = ["C_TYPES", "TemplateNotFound", "ctype", "cfloat", "cbool", "cident", "environment", "render",
           "template_source", "template_header", "list_templates"]

TEMPLATE_PACKAGE = "pigeon"
TEMPLATE_DIR = "templates"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

TemplateNotFound = jinja2.TemplateNotFound

# dtype name -> C storage type
C_TYPES = {
    "float32": "float",
    "float64": "double",
    "bfloat16": "__nv_bfloat16",
    "float16": "__half",
    "int32": "int",
    "int64": "long long",
    "uint8": "unsigned char",
    "bool": "bool",
}


def ctype(dtype: Any) -> str:
    """C storage type of a dtype name (``'float32'``, ``'bfloat16'``, ...) or ``torch.dtype``."""
    name = str(dtype)
    if name.startswith("torch."):
        name = name[len("torch."):]
    name = {"float": "float32", "half": "float16", "double": "float64", "int": "int32", "long": "int64"}.get(name, name)
    if name not in C_TYPES:
        raise ValueError(f"no C type for dtype {dtype!r} (known: {sorted(C_TYPES)})")
    return C_TYPES[name]


def cfloat(x: Any) -> str:
    """A C float literal exactly equal to ``float32(x)`` (NaN / inf through ``__int_as_float``)."""
    f = _ctypes.c_float(float(x)).value
    if math.isnan(f):
        return "__int_as_float(0x7fc00000)"
    if math.isinf(f):
        return "__int_as_float(0x7f800000)" if f > 0 else "(-__int_as_float(0x7f800000))"
    s = format(f, ".9g")
    if "." not in s and "e" not in s and "n" not in s:
        s += "."
    s += "f"
    return f"({s})" if s.startswith("-") else s


def cbool(x: Any) -> str:
    return "true" if x else "false"


def cident(x: Any) -> str:
    if not isinstance(x, str) or not _IDENT.match(x):
        raise ValueError(f"{x!r} is not a C identifier")
    return x


class ResourceLoader(jinja2.BaseLoader):
    """Loads ``<package>/<folder>/<name>`` through ``importlib.resources.files``."""

    def __init__(self, package: str = TEMPLATE_PACKAGE, folder: str = TEMPLATE_DIR):
        self.package, self.folder = package, folder

    def _root(self):
        return resources.files(self.package).joinpath(self.folder)

    def get_source(self, environment: jinja2.Environment, template: str):
        if not _NAME.match(template):
            raise TemplateNotFound(template)
        res = self._root().joinpath(template)
        if not res.is_file():
            raise TemplateNotFound(template)
        text = res.read_text(encoding="utf-8")
        return text, f"{self.package}/{self.folder}/{template}", lambda: True

    def list_templates(self) -> list[str]:
        return sorted(p.name for p in self._root().iterdir() if p.name.endswith(".jinja"))


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=ResourceLoader(),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        auto_reload=False,
    )
    env.filters.update(ctype=ctype, cfloat=cfloat, cbool=cbool, cident=cident)
    return env


def render(template_name: str, config: Any, **extra: Any) -> str:
    """Render ``template_name`` with ``c=config`` and ``extra`` as further variables."""
    if "c" in extra:
        raise TypeError("render(): 'c' is the config object; pass it positionally")
    return environment().get_template(template_name).render(c=config, **extra)


def template_source(template_name: str) -> str:
    """The raw text of a template."""
    src, _, _ = environment().loader.get_source(environment(), template_name)  # type: ignore[union-attr]
    return src


def template_header(template_name: str) -> str:
    """The opening ``{# ... #}`` comment of a template (its parameter list); '' if it has none."""
    m = re.match(r"\s*\{#-?(.*?)-?#\}", template_source(template_name), re.S)
    return m.group(1).strip() if m else ""


def list_templates() -> list[str]:
    return environment().list_templates()
