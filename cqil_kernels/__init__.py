"""cqil_kernels: CQIL (Concurrent Computation of Quasi-Independent Layers) for LLM inference.

Importing this package has no side effects: it sets no environment variables, adds no logging
handlers and never touches CUDA. Triton kernels are imported only when a Triton backend is used.
"""

from .conversion import convert, from_pretrained, get_plan, is_converted, revert
from .engine import DecodeEngine, generate
from .plan import CQILPlan

__version__ = "0.1.0"

__all__ = ["CQILPlan", "convert", "revert", "get_plan", "is_converted", "from_pretrained", "DecodeEngine", "generate", "__version__"]
