"""Attention variants in pigeon's compiler: traced score/mask modifiers (expression IR), closed-form
sparse patterns with their block iteration lists, the reference semantics (the oracle), and the
kernels' torch ops (pigeon/attention/ops.py; see pigeon/attention/api.py)."""
from .api import AttentionInputError, attention, check_inputs
from .mods import ModError, cast, exp, maximum, minimum, sigmoid, tanh, trace_mask_mod, trace_score_mod, where
from .patterns import S2, BlockList, BlockLists, Causal, PatternError, SlidingWindow, TopK, block_lists, dense_mask
from .reference import attention_reference

__all__ = ["AttentionInputError", "attention", "check_inputs", "ModError", "cast", "exp", "maximum", "minimum",
           "sigmoid", "tanh", "trace_mask_mod", "trace_score_mod", "where", "S2", "BlockList", "BlockLists",
           "Causal", "PatternError", "SlidingWindow", "TopK", "block_lists", "dense_mask", "attention_reference"]
