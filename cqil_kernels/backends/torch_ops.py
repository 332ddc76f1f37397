"""The torch op set: plain torch math on the stacked buffers (references of the fused kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

decode_attention = None  # the group uses the model's own attention function


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    # HF numerics: normalise in fp32, cast back before the weight multiply
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x, weight, eps):
    """x [..., D] * broadcastable weight [..., D] -> [..., D]."""
    return weight * _rms(x, eps)


def qkv_gemm(x, norm_weight, weight, bias, eps):
    """x [M, H], norm_weight [P, H] | None, weight [P*N, H], bias [P*N] | None -> [M, P*N]."""
    M, H = x.shape
    if norm_weight is None:
        return F.linear(x, weight, bias)
    P = norm_weight.shape[0]
    N = weight.shape[0] // P
    xn = norm_weight[:, None, :] * _rms(x, eps)[None]  # [P, M, H]
    out = torch.bmm(xn, weight.view(P, N, H).transpose(1, 2))  # [P, M, N]
    if bias is not None:
        out = out + bias.view(P, 1, N)
    return out.transpose(0, 1).reshape(M, P * N)


def batched_gemm(x, weight, bias=None):
    """x [P, M, K], weight [P, N, K], bias [P, N] | None -> [P, M, N]."""
    out = torch.bmm(x, weight.transpose(1, 2))
    return out if bias is None else out + bias[:, None, :]


def gate_up_silu(u, norm_weight, weight, eps):
    """u [P, M, H], norm_weight [P, H] | None, weight [P, 2I, H] -> silu(gate) * up [P, M, I]."""
    xn = u if norm_weight is None else norm_weight[:, None, :] * _rms(u, eps)
    gu = torch.bmm(xn, weight.transpose(1, 2))
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def down_sum(m, weight, residual, attn=None):
    """m [P, M, I], weight [P, H, I], residual [M, H], attn [P, M, H] | None -> [M, H]."""
    out = residual if attn is None else residual + attn.sum(0)
    return out + torch.bmm(m, weight.transpose(1, 2)).sum(0)
