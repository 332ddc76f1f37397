"""Output buffers and fp32 workspaces of the kernels.

Workspaces hold split-K / split-KV partials. With ``LaunchConfig.poison_workspaces`` (tests) they
are filled with NaN, so a program that skips its slice cannot pass. Under the interpreter a bf16
result is stored as fp32 and rounded by torch (the interpreter truncates fp32 -> bf16 casts, the
GPU rounds to nearest).
"""

import torch

from ..launch_config import launch_config_for
from ._triton import interpreted

__all__ = ["workspace", "check_out", "kernel_out", "finish_out", "compute_dtype"]


def workspace(shape, t: torch.Tensor) -> torch.Tensor:
    """A fresh fp32 buffer on t's device (NaN-filled when the launch config poisons workspaces)."""
    ws = torch.empty(shape, device=t.device, dtype=torch.float32)
    if launch_config_for(t.device).poison_workspaces:
        ws.fill_(float("nan"))
    return ws


def check_out(out: torch.Tensor | None, shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    dtype = like.dtype if dtype is None else dtype
    if out is None:
        return torch.empty(shape, device=like.device, dtype=dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != like.device:
        raise ValueError(f"out must be {tuple(shape)} {dtype} on {like.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def kernel_out(out: torch.Tensor) -> torch.Tensor:
    """Buffer the kernel stores into. The interpreter converts fp32 -> bf16 by truncation (the GPU
    rounds to nearest), which would double the output rounding error; under the interpreter a bf16
    result is therefore stored as fp32 and rounded by torch in :func:`finish_out`."""
    if out.dtype == torch.bfloat16 and interpreted(out):
        return workspace(out.shape, out)
    return out


def finish_out(out: torch.Tensor, kout: torch.Tensor) -> torch.Tensor:
    if kout is not out:
        out.copy_(kout)
    return out


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, unchanged for fp32/fp64 (so an fp64 reference stays fp64)."""
    return torch.promote_types(dtype, torch.float32)
