"""Optional compiled kernels (``cqil_kernels._C``): guarded loading and the torch custom op.

The compiled module is built by ``setup.py``/``CMakeLists.txt`` where a toolchain is present
(see ``csrc/README.md``) and is never required. This module is not imported by
``import cqil_kernels``, and importing it does nothing but define functions: the extension is
loaded on the first call of :func:`load` (or anything that needs it), without an error or a
warning if it is missing, and the custom op ``cqil::decode_attention_cuda`` is registered by
:func:`register_ops` on first use.

Example::

    from cqil_kernels import compiled
    out = compiled.decode_attention(q, k_caches, v_caches, kv_mask, kv_len)
    # CUDA tensors and a CUDA build: the split-KV kernel; otherwise the torch reference.

Shapes: ``q`` [B, P*nh, D] (one token per sequence; head ``j*nh + h`` belongs to layer ``j``),
``k_caches``/``v_caches`` lists of P tensors [B, nkv, S, D], ``kv_mask`` [B, S] bool/uint8 or None,
``kv_len`` (positions >= kv_len are ignored). Returns [B, P*nh, D] in q's dtype.
"""

import importlib
import math
import threading
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = [
    "available",
    "cuda_built",
    "load",
    "load_error",
    "register_ops",
    "decode_attention",
    "decode_attention_cpu",
    "decode_attention_reference",
]

_lock = threading.Lock()
_module = None
_load_error: Optional[str] = None
_load_tried = False
_ops_registered = False

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc DType enum
_MASK_DTYPES = (torch.bool, torch.uint8)


def load():
    """The compiled module ``cqil_kernels._C``, or None if it is not built (no warning)."""
    global _module, _load_error, _load_tried
    if not _load_tried:
        with _lock:
            if not _load_tried:
                try:
                    _module = importlib.import_module("cqil_kernels._C")
                except (ImportError, OSError) as exc:  # not built, or built for another ABI
                    _module, _load_error = None, f"{type(exc).__name__}: {exc}"
                _load_tried = True
    return _module


def available() -> bool:
    """True when the compiled module is importable (its CPU implementation always is then)."""
    return load() is not None


def cuda_built() -> bool:
    """True when the compiled module contains the CUDA launcher (says nothing of a GPU)."""
    module = load()
    return module is not None and bool(getattr(module, "has_cuda", False))


def load_error() -> Optional[str]:
    """Why :func:`load` returned None (None if it loaded or was not tried)."""
    return _load_error


# ---------------------------------------------------------------------------------------------
# Input checks and the raw-pointer parameter block, shared by the CPU wrapper and the CUDA op.


def _check_inputs(q, k_caches, v_caches, kv_mask, kv_len, device_types) -> Tuple[int, ...]:
    """Validates shapes/dtypes/devices; returns (B, P, nh, nkv, S, D). Works on fake tensors."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a 3-D tensor [B, P*nh, D], got shape {tuple(getattr(q, 'shape', ()))}")
    if q.device.type not in device_types:
        raise ValueError(f"q must be on {' or '.join(device_types)}, got {q.device}")
    if q.dtype not in _DTYPE_CODES:
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    P = len(k_caches)
    if P == 0 or len(v_caches) != P:
        raise ValueError(f"need P >= 1 K caches and as many V caches, got {P} and {len(v_caches)}")
    B, HQ, D = q.shape
    if HQ % P != 0:
        raise ValueError(f"q has {HQ} heads, not a multiple of P={P} layers")
    nh = HQ // P
    ref = k_caches[0]
    if ref.dim() != 4:
        raise ValueError(f"caches must be 4-D [B, nkv, S, D], got shape {tuple(ref.shape)}")
    _, nkv, S, _ = ref.shape
    for name, caches in (("k_caches", k_caches), ("v_caches", v_caches)):
        for j, c in enumerate(caches):
            if tuple(c.shape) != (B, nkv, S, D):
                raise ValueError(
                    f"{name}[{j}] has shape {tuple(c.shape)}, expected {(B, nkv, S, D)} "
                    f"(B and D from q [B, P*nh, D], nkv and S from k_caches[0])"
                )
            if c.dtype != q.dtype:
                raise TypeError(f"{name}[{j}] is {c.dtype}, q is {q.dtype}")
            if c.device != q.device:
                raise ValueError(f"{name}[{j}] is on {c.device}, q is on {q.device}")
    if nh % nkv != 0:
        raise ValueError(f"query heads per layer ({nh}) must be a multiple of kv heads ({nkv})")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim must be in [1, 256], got {D}")
    if kv_mask is not None:
        if tuple(kv_mask.shape) != (B, S):
            raise ValueError(f"kv_mask has shape {tuple(kv_mask.shape)}, expected {(B, S)}")
        if kv_mask.dtype not in _MASK_DTYPES:
            raise TypeError(f"kv_mask must be bool or uint8, got {kv_mask.dtype}")
        if kv_mask.device != q.device:
            raise ValueError(f"kv_mask is on {kv_mask.device}, q is on {q.device}")
    if not 0 <= kv_len <= S:
        raise ValueError(f"kv_len must be in [0, S={S}], got {kv_len}")
    return B, P, nh, nkv, S, D


def _layer_base(caches: Sequence[torch.Tensor], kv_len: int) -> Tuple[torch.Tensor, int]:
    """(layer 0 view, per-layer element stride) for caches given as one base + stride.

    Caches that are equally spaced views of one storage with identical strides (e.g. slices of a
    [P, B, nkv, S, D] buffer) are used in place. Anything else is stacked into a new buffer
    (first ``kv_len`` positions only), which costs a copy.
    """
    c0 = caches[0]
    if c0.stride(-1) == 1:
        if len(caches) == 1:
            return c0, 0
        elsize = c0.element_size()
        storage = c0.untyped_storage().data_ptr()
        same_layout = all(
            c.stride() == c0.stride() and c.untyped_storage().data_ptr() == storage for c in caches
        )
        if same_layout:
            offsets = [c.data_ptr() - c0.data_ptr() for c in caches]
            if all(o % elsize == 0 for o in offsets):
                step = offsets[1] // elsize
                if all(o // elsize == j * step for j, o in enumerate(offsets)):
                    return c0, step
    stacked = torch.stack([c[:, :, :kv_len] for c in caches]).contiguous()
    return stacked[0], stacked.stride(0)


def _make_params(module, q, k_caches, v_caches, kv_mask, kv_len, scale, out, num_splits, dims):
    """Fills a DecodeAttnParams with data pointers; returns (params, tensors to keep alive)."""
    B, P, nh, nkv, S, D = dims
    if q.stride(-1) != 1:
        q = q.contiguous()
    k0, k_layer = _layer_base(k_caches, kv_len)
    v0, v_layer = _layer_base(v_caches, kv_len)
    workspace = torch.empty(
        module.workspace_floats(B, P * nh, D, num_splits), dtype=torch.float32, device=q.device
    )
    p = module.DecodeAttnParams()
    p.q, p.q_stride_b, p.q_stride_h = q.data_ptr(), q.stride(0), q.stride(1)
    p.k, p.k_stride_layer = k0.data_ptr(), k_layer
    p.k_stride_b, p.k_stride_h, p.k_stride_s = k0.stride(0), k0.stride(1), k0.stride(2)
    p.v, p.v_stride_layer = v0.data_ptr(), v_layer
    p.v_stride_b, p.v_stride_h, p.v_stride_s = v0.stride(0), v0.stride(1), v0.stride(2)
    if kv_mask is not None:
        p.kv_mask = kv_mask.data_ptr()
        p.mask_stride_b, p.mask_stride_s = kv_mask.stride(0), kv_mask.stride(1)
    p.out, p.out_stride_b, p.out_stride_h = out.data_ptr(), out.stride(0), out.stride(1)
    p.workspace = workspace.data_ptr()
    p.batch, p.num_layers, p.num_heads, p.num_kv_heads = B, P, nh, nkv
    p.seq_len, p.head_dim, p.kv_len, p.num_splits = S, D, kv_len, num_splits
    p.scale, p.dtype = float(scale), _DTYPE_CODES[q.dtype]
    return p, (q, k0, v0, workspace)


# ---------------------------------------------------------------------------------------------
# Public functions.


def decode_attention_reference(
    q: torch.Tensor,
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    kv_mask: Optional[torch.Tensor] = None,
    kv_len: Optional[int] = None,
    scale: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ops' torch reference (``cqil_kernels.ops.decode_attention_reference``) run in
    ``compute_dtype``, with this module's defaults (kv_len = S, scale = D**-0.5); the fallback.

    Rows with no key to attend to give zeros, as the kernels do. Returns [B, P*nh, D] in q's dtype.
    """
    from .ops import decode_attention_reference as reference

    kv_len = k_caches[0].shape[2] if kv_len is None else kv_len
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    up = [t.to(compute_dtype) for t in k_caches], [t.to(compute_dtype) for t in v_caches]
    return reference(q.to(compute_dtype), up[0], up[1], kv_mask, kv_len, scale).to(q.dtype)


def decode_attention_cpu(
    q: torch.Tensor,
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    kv_mask: Optional[torch.Tensor] = None,
    kv_len: Optional[int] = None,
    scale: Optional[float] = None,
    num_splits: int = 1,
) -> torch.Tensor:
    """The C++ CPU implementation (float32; same split-KV algorithm as the CUDA kernel).

    Meant for tests of the algorithm, not for speed. Raises RuntimeError if ``_C`` is not built.
    """
    module = load()
    if module is None:
        raise RuntimeError(f"cqil_kernels._C is not built ({_load_error}); see csrc/README.md")
    kv_len = k_caches[0].shape[2] if kv_len is None else int(kv_len)
    dims = _check_inputs(q, k_caches, v_caches, kv_mask, kv_len, ("cpu",))
    if q.dtype != torch.float32:
        raise TypeError(f"the CPU implementation takes float32 only, got {q.dtype}")
    scale = 1.0 / math.sqrt(dims[-1]) if scale is None else scale
    out = torch.empty(q.shape, dtype=q.dtype)
    params, keep = _make_params(module, q, k_caches, v_caches, kv_mask, kv_len, scale, out,
                                int(num_splits), dims)
    module.decode_attention_cpu(params)
    del keep
    return out


_num_sms_cache = {}


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _num_sms_cache:
        _num_sms_cache[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _num_sms_cache[index]


def register_ops() -> bool:
    """Registers ``torch.ops.cqil.decode_attention_cuda`` once; False if there is no CUDA build.

    Schema: ``cqil::decode_attention_cuda(Tensor q, Tensor[] k_caches, Tensor[] v_caches,
    Tensor? kv_mask, int kv_len, float scale) -> Tensor``, with a fake (meta) implementation so
    that it traces under torch.compile.
    """
    global _ops_registered
    if _ops_registered:
        return True
    module = load()
    if module is None or not getattr(module, "has_cuda", False):
        return False
    with _lock:
        if not _ops_registered:
            _define_ops(module)
            _ops_registered = True
    return True


def _define_ops(module) -> None:
    @torch.library.custom_op("cqil::decode_attention_cuda", mutates_args=(), device_types="cuda")
    def decode_attention_cuda(
        q: torch.Tensor,
        k_caches: List[torch.Tensor],
        v_caches: List[torch.Tensor],
        kv_mask: Optional[torch.Tensor],
        kv_len: int,
        scale: float,
    ) -> torch.Tensor:
        dims = _check_inputs(q, k_caches, v_caches, kv_mask, kv_len, ("cuda",))
        B, P, nh, _, _, _ = dims
        with torch.cuda.device(q.device):
            num_splits = module.decode_attention_num_splits(B * P * nh, kv_len, _num_sms(q.device))
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            params, keep = _make_params(module, q, k_caches, v_caches, kv_mask, kv_len, scale,
                                        out, num_splits, dims)
            # Buffers made here (workspace, stacked caches) are freed to the caching allocator
            # when `keep` dies, which is stream-ordered: safe while the launch is pending.
            module.decode_attention_cuda(params, torch.cuda.current_stream(q.device).cuda_stream)
            del keep
        return out

    @decode_attention_cuda.register_fake
    def _(q, k_caches, v_caches, kv_mask, kv_len, scale):
        _check_inputs(q, k_caches, v_caches, kv_mask, kv_len, ("cuda", "meta"))
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def decode_attention(
    q: torch.Tensor,
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    kv_mask: Optional[torch.Tensor] = None,
    kv_len: Optional[int] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Decode attention of a CQIL group: the CUDA op where it can run, else the torch reference.

    Args:
        q: [B, P*nh, D] queries of the P layers (one token per sequence).
        k_caches, v_caches: P tensors [B, nkv, S, D] each (any batch/head/seq strides).
        kv_mask: [B, S] bool/uint8, nonzero = attend; None attends to all positions < kv_len.
        kv_len: number of valid positions (default S).
        scale: softmax scale (default 1/sqrt(D)).

    Returns:
        [B, P*nh, D] in q's dtype.

    Example::

        q = torch.randn(2, 3 * 8, 64, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(2, 3, 2, 4, 128, 64, device="cuda", dtype=torch.bfloat16)  # K/V, P, B, nkv, S, D
        out = decode_attention(q, list(kv[0]), list(kv[1]), kv_len=100)
    """
    kv_len = k_caches[0].shape[2] if kv_len is None else int(kv_len)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.is_cuda and register_ops():
        return torch.ops.cqil.decode_attention_cuda(
            q, list(k_caches), list(v_caches), kv_mask, kv_len, scale
        )
    return decode_attention_reference(q, k_caches, v_caches, kv_mask, kv_len, scale)
