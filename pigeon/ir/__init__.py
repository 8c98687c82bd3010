from .graph import IRGraph
from .ops import Op, OpKind, SignatureError, SourceLoc, infer_type, make_op
from .printer import format_ir
from .types import Domain, TypeAxis, ValueType
from .verify import VerifyError, verify

__all__ = ["IRGraph", "Op", "OpKind", "SignatureError", "SourceLoc", "infer_type", "make_op", "format_ir",
           "Domain", "TypeAxis", "ValueType", "VerifyError", "verify"]
