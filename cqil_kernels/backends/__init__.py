"""Backends: the op sets a CQIL group's stacked path runs on.

- ``"torch"``: the torch references of every op (any device; the CPU fallback and the oracle).
- ``"triton"``: the fused Triton kernels (CUDA natively; CPU under ``TRITON_INTERPRET=1``).

An op set provides ``qkv_gemm``, ``batched_gemm``, ``gate_up_silu``, ``down_sum``, ``rms_norm`` and
optionally ``decode_attention`` (None: the group uses the model's own attention function).
"""

from __future__ import annotations

import os

__all__ = ["get_ops", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_usable(device) -> bool:
    """Triton kernels can run on ``device``: compiled on CUDA, interpreted on CPU."""
    import torch

    device = torch.device(device)
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device) -> str:
    """Map "auto" to the best backend for ``device``; check that an explicit one can run there."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        import torch

        return "triton" if torch.device(device).type == "cuda" and triton_usable(device) else "torch"
    if backend == "triton" and not triton_usable(device):
        raise ValueError(
            f"backend='triton' cannot run on {device}: it needs triton installed and a CUDA device, "
            "or TRITON_INTERPRET=1 set before cqil_kernels' kernels are imported (CPU interpreter)"
        )
    return backend


def get_ops(backend: str):
    if backend == "torch":
        from . import torch_ops

        return torch_ops
    if backend == "triton":
        from . import triton_ops

        return triton_ops
    raise ValueError(f"unknown backend {backend!r}")
