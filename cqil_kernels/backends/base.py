"""The op-set interface: every op a CQIL group and the decode engine call, chosen once.

An op set is an object (:class:`OpSet`); the group and the engine call its methods and never pick
an implementation themselves. Two GEMM implementations exist - the torch references
(``TorchOps``) and the fused Triton kernels (``TritonOps``) - and each takes its decode attention
from the same family by default, or from the compiled CUDA kernel of ``csrc/`` (``"+csrc"``: its
C++ CPU twin on the CPU, float32), so the two attentions can be timed against each other.

Op sets are named (``"torch"``, ``"triton"``, ``"torch+csrc"``, ``"triton+csrc"``) and copy and
pickle as their name (``__reduce__`` looks the singleton up again), so an engine or a group holding
one stays deep-copyable and picklable.
"""

from __future__ import annotations

import abc

import torch

__all__ = ["OpSet", "kv_mask_from_hf"]


def kv_mask_from_hf(attention_mask, kv_len: int, batch: int):
    """The [B, S] keep-mask of one decode step from transformers' mask, or False if unsupported.

    Handles: None (every cached position is valid), 4D bool [B, 1, 1, S] (True = attend) and 4D
    additive float [B, 1, 1, S] (0 = attend). Anything else (BlockMask, 2D padding masks of flash
    attention, mismatched lengths) returns False and the caller uses the model's attention.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return False
    if attention_mask.shape[-1] != kv_len or attention_mask.shape[0] not in (1, batch) or attention_mask.shape[1] != 1:
        return False
    row = attention_mask[:, 0, -1, :]
    keep = row if row.dtype == torch.bool else row == 0
    return keep.expand(batch, kv_len)


class OpSet(abc.ABC):
    """What a group's fused path and the decode engine run. Shapes: H hidden, P layers, M rows.

    Subclasses implement the GEMMs and the cached decode attention; ``decode_attention`` (the
    transformers-mask form the group uses) and ``rms_norm`` have shared implementations.
    """

    #: "default" (the GEMM family's own attention) or "csrc" (the compiled kernel)
    attention: str = "default"

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self):
        from . import get_ops

        return (get_ops, (self.name,))

    def __repr__(self) -> str:
        return f"<op set {self.name!r}>"

    # ------------------------------------------------------------------ GEMMs (see cqil_kernels.ops)
    @abc.abstractmethod
    def qkv_gemm(self, x, norm_weights, weights, biases, eps):
        """x [M, H] -> [M, P*N]: per-layer RMSNorm + q/k/v projection (``ops.qkv_gemm``)."""

    @abc.abstractmethod
    def qkv_rope_cache(self, x, norm_weights, weights, biases, eps, cos, sin, q_norms, k_norms, qk_eps,
                       k_cache, v_cache, layer0, slot, tokens_per_seq, num_heads):
        """Static-cache decode: q [M, P*nh, D] rotated; k/v written into the caches (``ops.qkv_rope_cache``)."""

    @abc.abstractmethod
    def batched_gemm(self, x, weights, biases=None):
        """x [P, M, K] -> [P, M, N], each layer its own weight (``ops.batched_gemm``)."""

    @abc.abstractmethod
    def gate_up_silu(self, u, norm_weights, gate_weights, up_weights, eps, residual=None, bypass=0, context=0):
        """[C + P, M, H] -> [P, M, I]: post-norm + gate/up + SiLU*up (``ops.gate_up_silu``)."""

    @abc.abstractmethod
    def down_sum(self, m, weights, residual, attn=None):
        """[P, M, I] -> [M, H]: residual + sum of attention and down projections (``ops.down_sum``)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [..., D] normalised over D, times a broadcastable weight [..., D] (HF RMSNorm numerics;
        Qwen3's per-head q/k norm: tiny, torch in every op set)."""
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    # ------------------------------------------------------------------ attention
    @abc.abstractmethod
    def cached_decode_attention(self, q, k_caches, v_caches, kv_mask, kv_len: int, scale: float,
                                last_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Decode attention over static caches (the engine): q [B, P*nh, D], P caches
        [B, nkv, S, D] each, kv_mask [B, S] bool or None -> [B, P*nh, D]. ``last_pos`` (a
        device scalar, or None: ``kv_len - 1``) is the last live slot: later slots take no part
        (and, where the kernel can, are not read), so a captured step stays valid as the
        sequence grows."""

    def decode_attention(self, q, keys, values, attention_mask, sliding_window, scale):
        """One decode step over transformers' caches (the group's forward): q [B, P*nh, 1, D],
        P caches [B, nkv, S, D] -> [B, P*nh, D], or None: the group uses the model's own
        attention function (several query tokens, a sliding window that cuts the cache, a mask
        form this cannot read)."""
        B, _, T, _ = q.shape
        S = keys[0].shape[2]
        if T != 1 or (sliding_window is not None and S > sliding_window):
            return None  # the window is applied by transformers' mask/attention; keep it there
        keep = kv_mask_from_hf(attention_mask, S, B)
        if keep is False:
            return None
        return self.cached_decode_attention(q[:, :, 0], keys, values, keep, S, scale)

    # ------------------------------------------------------------------ set-up
    def prepare(self, device) -> None:
        """Allocate what launches on ``device`` need before any CUDA-graph capture (``convert``
        and ``DecodeEngine`` call it); nothing by default."""


def csrc_decode_attention(q, k_caches, v_caches, kv_mask, kv_len: int, scale: float,
                          last_pos: torch.Tensor | None = None) -> torch.Tensor:
    """The compiled split-KV attention (``cqil_kernels.compiled``): the CUDA kernel on a GPU, the
    C++ twin on the CPU (float32 only; a clear TypeError otherwise). It reads all ``kv_len``
    slots; ``last_pos`` is folded into the mask (the slots after it take no part)."""
    from .. import compiled

    if last_pos is not None:
        live = torch.arange(kv_len, device=q.device) <= last_pos  # on the device: graph-safe
        kv_mask = live.expand(q.shape[0], kv_len) if kv_mask is None else kv_mask[:, :kv_len].to(torch.bool) & live

    if q.is_cuda:
        return compiled.decode_attention(q, k_caches, v_caches, kv_mask, kv_len, scale)
    return compiled.decode_attention_cpu(q, k_caches, v_caches, kv_mask, kv_len, scale)


def prepare_csrc(device) -> None:
    """Load the compiled module and register its CUDA op now (not inside a capture)."""
    from .. import compiled

    compiled.load()
    if torch.device(device).type == "cuda":
        compiled.register_ops()
