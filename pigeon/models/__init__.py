"""Ready-made specs. Each is an ordinary spec: nothing here is special-cased by the compiler."""
from .hgt import hgt
from .rgat import rgat
from .rgcn import rgcn

MODELS = {"rgcn": rgcn, "rgat": rgat, "hgt": hgt}
__all__ = ["rgcn", "rgat", "hgt", "MODELS"]
