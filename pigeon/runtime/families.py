"""The built-in kernel families; importing this module registers them."""
from . import family_gemm, family_host, family_traversal
from .family import FAMILIES, KernelFamily, family_of, register_family, run_launch

BUILTIN = (family_gemm.GEMM, family_host.HOST_ADD, family_host.HOST_INDEX, family_traversal.TRAVERSAL)
__all__ = ["BUILTIN", "FAMILIES", "KernelFamily", "family_of", "register_family", "run_launch"]
