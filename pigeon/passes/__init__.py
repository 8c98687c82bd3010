from .manager import PIPELINE, PassError, PassRecord, run_pipeline, run_to_fixpoint

__all__ = ["PIPELINE", "PassError", "PassRecord", "run_pipeline", "run_to_fixpoint"]
