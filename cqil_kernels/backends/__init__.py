"""Backends: the op sets (:class:`~cqil_kernels.backends.base.OpSet`) a CQIL group and the decode
engine run on, chosen once by name.

- ``"torch"``: the torch references of every op (any device; the CPU fallback and the oracle).
- ``"triton"``: the fused Triton kernels (CUDA natively; CPU under ``TRITON_INTERPRET=1``).
- ``"torch+csrc"`` / ``"triton+csrc"``: the same GEMMs, with the compiled split-KV decode
  attention of ``csrc/`` (CUDA kernel on a GPU; its C++ twin, float32, on the CPU). Needs the
  compiled module ``cqil_kernels._C``.
- ``"auto"``: ``"triton"`` on CUDA, ``"torch"`` elsewhere.

``get_ops(name)`` returns the op set (one instance per name); importing this package imports no
kernels (``get_ops("triton")`` imports Triton).
"""

from __future__ import annotations

import threading

from .base import OpSet

__all__ = ["get_ops", "resolve_backend", "parse_backend", "BACKENDS", "OpSet"]

BACKENDS = ("auto", "torch", "triton", "torch+csrc", "triton+csrc")
_GEMMS = ("torch", "triton")
_ATTENTIONS = ("csrc",)

_INSTANCES: dict = {}
_LOCK = threading.Lock()


def parse_backend(backend: str) -> tuple[str, str]:
    """``"triton+csrc"`` -> ("triton", "csrc"); ``"torch"`` -> ("torch", "default")."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    gemms, plus, attention = backend.partition("+")
    if gemms not in _GEMMS or (plus and attention not in _ATTENTIONS):
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return gemms, attention or "default"


def _triton_usable(device) -> bool:
    # Importing the ops imports Triton; only done when Triton is asked for or the device is CUDA.
    from ..ops import triton_usable

    return triton_usable(device)


def _check_csrc(backend: str, device) -> None:
    from .. import compiled

    if not compiled.available():
        raise ValueError(f"backend={backend!r} needs the compiled module cqil_kernels._C, which is not built "
                         f"({compiled.load_error()}); see csrc/README.md")
    if device.type == "cuda" and not compiled.cuda_built():
        raise ValueError(f"backend={backend!r} on {device} needs cqil_kernels._C built with CUDA; this build has "
                         "the CPU implementation only")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"backend={backend!r} runs on CUDA or the CPU, not on {device}")


def resolve_backend(backend: str, device) -> str:
    """Map "auto" to the best backend for ``device``; check that an explicit one can run there."""
    import torch

    if backend == "auto":
        device = torch.device(device)
        return "triton" if device.type == "cuda" and _triton_usable(device) else "torch"
    gemms, attention = parse_backend(backend)
    device = torch.device(device)
    if gemms == "triton" and not _triton_usable(device):
        raise ValueError(
            f"backend={backend!r} cannot run on {device}: it needs triton installed and a CUDA device, "
            "or TRITON_INTERPRET=1 set before cqil_kernels.ops is first imported (CPU interpreter)"
        )
    if attention == "csrc":
        _check_csrc(backend, device)
    return backend


def get_ops(backend: str) -> OpSet:
    """The op set named ``backend`` (not "auto": resolve it first)."""
    if backend == "auto":
        raise ValueError("get_ops needs a resolved backend: call resolve_backend('auto', device) first")
    ops = _INSTANCES.get(backend)
    if ops is not None:
        return ops
    gemms, attention = parse_backend(backend)
    with _LOCK:
        ops = _INSTANCES.get(backend)
        if ops is None:
            if gemms == "torch":
                from .torch_ops import TorchOps

                ops = TorchOps(backend, attention)
            else:
                from .triton_ops import TritonOps

                ops = TritonOps(backend, attention)
            _INSTANCES[backend] = ops
    return ops
