"""cqil_kernels: CQIL (Concurrent Computation of Quasi-Independent Layers) for LLM inference.

Importing this package has no side effects: it sets no environment variables, adds no logging
handlers and never touches CUDA. Triton kernels are imported only when a Triton backend is used.
"""

from . import distributed  # noqa: F401  (cqil_kernels.distributed.init(), ...; creates no process group)
from .analysis import GroupCost, LayerAnalysis, analyze
from .calibrate import CalibrationResult, GroupCalibration, calibrate
from .conversion import convert, from_pretrained, get_plan, is_converted, revert
from .distill import DistillResult, distill
from .engine import DecodeEngine, generate
from .group import CQILDecoderGroup
from .evaluate import EvalResult, base_log_probs, compare_plans, evaluate, plan_applied
from .loading import load_model
from .plan import CQILPlan
from .search import SearchResult, search
from .texts import TokenWindows, default_text, load_windows, make_windows, read_text
from .tuning import TuneResult, tune

__version__ = "0.1.0"

__all__ = [
    # plans and conversion
    "CQILPlan",
    "convert",
    "revert",
    "get_plan",
    "is_converted",
    "from_pretrained",
    "CQILDecoderGroup",
    # low-latency generation
    "DecodeEngine",
    "generate",
    # choosing layers: data, evaluation, analysis, search
    "load_model",
    "TokenWindows",
    "default_text",
    "read_text",
    "make_windows",
    "load_windows",
    "evaluate",
    "compare_plans",
    "base_log_probs",
    "EvalResult",
    "plan_applied",
    "analyze",
    "LayerAnalysis",
    "GroupCost",
    "search",
    "SearchResult",
    # recovering quality after conversion
    "calibrate",
    "CalibrationResult",
    "GroupCalibration",
    "distill",
    "DistillResult",
    # the fastest plan on this machine within a quality budget
    "tune",
    "TuneResult",
    "__version__",
]
