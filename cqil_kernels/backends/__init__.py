"""Backends: the op sets a CQIL group's stacked path runs on.

- ``"torch"``: the torch references of every op (any device; the CPU fallback and the oracle).
- ``"triton"``: the fused Triton kernels (CUDA natively; CPU under ``TRITON_INTERPRET=1``).

An op set provides ``qkv_gemm``, ``qkv_rope_cache`` (static-cache decode), ``batched_gemm``,
``gate_up_silu``, ``down_sum``, ``rms_norm`` and ``decode_attention`` (None, or a function that may return None: the group then uses the model's
own attention function).
"""

from __future__ import annotations

__all__ = ["get_ops", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")


def _triton_usable(device) -> bool:
    # Importing the ops imports Triton; only done when Triton is asked for or the device is CUDA.
    from ..ops import triton_usable

    return triton_usable(device)


def resolve_backend(backend: str, device) -> str:
    """Map "auto" to the best backend for ``device``; check that an explicit one can run there."""
    import torch

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_usable(device) else "torch"
    if backend == "triton" and not _triton_usable(device):
        raise ValueError(
            f"backend='triton' cannot run on {device}: it needs triton installed and a CUDA device, "
            "or TRITON_INTERPRET=1 set before cqil_kernels.ops is first imported (CPU interpreter)"
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
