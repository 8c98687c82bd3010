from .pipeline import PIPELINE, Compilation, PassError, PassRecord, run_pipeline
from .rewrite import Pat, Rule, RewriteError, rewrite

__all__ = ["PIPELINE", "Compilation", "PassError", "PassRecord", "Pat", "Rule", "RewriteError", "rewrite",
           "run_pipeline"]
