"""qkv_gemm: fused per-layer RMSNorm + QKV GEMM of P layers (real Triton kernel; interpreter on CPU).

Each layer's q, k and v weights are separate tensors (as a loaded model holds them), read through
the kernel's offset table; the layouts cover separate allocations, views of one buffer and
unaligned offsets.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from ops_testing import (
    CPU_DTYPES, LAYOUTS, assert_error_budget, hi_dtype, layer_tensors, nan_empty, norm_weights, randn, upcast,
)
from ops_testing import poisoned_workspaces  # noqa: F401  (fixture)

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poisoned_workspaces")]

EPS = 1e-6


def _inputs(M, H, parts, P, dtype, device, norm=True, bias=True, seed=0, strided=False, layout="separate"):
    """parts: rows of each weight of a layer, e.g. (nh*D, nkv*D, nkv*D)."""
    g = torch.Generator().manual_seed(seed)
    if strided:  # every other column of a wider buffer: non-unit stride along K
        x = randn(M, 2 * H, dtype=dtype, device=device, scale=3.0, generator=g)[:, ::2]
    else:
        x = randn(M, H, dtype=dtype, device=device, scale=3.0, generator=g)
    nw = norm_weights(P, H, dtype, device, g, layout) if norm else None
    w = [t for _ in range(P) for n in parts
         for t in layer_tensors(1, (n, H), dtype, device, H ** -0.5, g, layout)]
    b = [t for _ in range(P) for n in parts for t in layer_tensors(1, (n,), dtype, device, 1.0, g, layout)] if bias else None
    return x, nw, w, b


def _check(device, dtype, M, H, parts, P, norm, bias, split_k, strided=False, seed=0, layout="separate"):
    from cqil_kernels.ops.qkv_gemm import qkv_gemm_reference, qkv_gemm_triton

    x, nw, w, b = _inputs(M, H, parts, P, dtype, device, norm, bias, seed, strided, layout)
    if not norm:
        P = 1  # without a norm every weight is applied to x: one layer of len(w) parts
    out = nan_empty((M, P * sum(parts) * (len(w) // (P * len(parts)))), dtype, device)
    res = qkv_gemm_triton(x, nw, w, b, EPS, out=out, split_k=split_k)
    assert res is out
    hi = hi_dtype(dtype)
    ref_hi = qkv_gemm_reference(upcast(x, hi), upcast(nw, hi), upcast(w, hi), upcast(b, hi), EPS)
    ref_lo = qkv_gemm_reference(x, nw, w, b, EPS)
    assert_error_budget(out, ref_hi, ref_lo)


CASES = [  # M, H (=K), parts per layer, P, norm, bias, split_k (None: heuristic), layout
    (1, 63, (7,), 1, True, False, None, "separate"),
    (1, 96, (40, 12, 12), 2, True, True, 3, "separate"),
    (3, 70, (33, 11, 11), 3, True, False, 2, "unaligned"),
    (16, 33, (20,), 1, False, True, None, "separate"),
    (33, 40, (36, 6, 6), 2, True, True, 1, "views"),
    (3, 129, (7, 2, 2), 4, True, True, 4, "unaligned"),
    (2, 48, (16, 8), 3, True, False, 2, "separate"),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("M,H,parts,P,norm,bias,split_k,layout", CASES)
def test_qkv_gemm_matches_reference(device, dtype, M, H, parts, P, norm, bias, split_k, layout):
    _check(device, dtype, M, H, parts, P, norm, bias, split_k, layout=layout)


@pytest.mark.parametrize("split_k", [1, 2])
def test_qkv_gemm_bf16_upcast_and_strided(device, split_k):
    _check(device, torch.bfloat16, 3, 45, (24, 8, 8), 2, True, True, split_k, strided=True)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    M=st.integers(1, 40), H=st.integers(1, 100), parts=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    P=st.integers(1, 4), norm=st.booleans(), bias=st.booleans(), split_k=st.integers(1, 4),
    dtype=st.sampled_from(CPU_DTYPES), seed=st.integers(0, 2**16), layout=st.sampled_from(LAYOUTS),
)
def test_qkv_gemm_fuzz(device, M, H, parts, P, norm, bias, split_k, dtype, seed, layout):
    _check(device, dtype, M, H, tuple(parts), P if norm else 1, norm, bias, split_k, seed=seed, layout=layout)


def test_qkv_gemm_rejects_mismatched_lists(device):
    from cqil_kernels.ops import qkv_gemm

    x, nw, w, b = _inputs(2, 40, (12, 4, 4), 2, torch.float32, device)
    with pytest.raises(ValueError, match="whole number of parts"):
        qkv_gemm(x, nw, w[:-1], None, EPS)
    with pytest.raises(ValueError, match="part sizes"):
        qkv_gemm(x, nw, w[:3] + [w[0], w[0], w[0]], None, EPS)
    with pytest.raises(ValueError, match="biases"):
        qkv_gemm(x, nw, w, b[:-1], EPS)


def test_qkv_gemm_dispatch(device, monkeypatch):
    from cqil_kernels.ops import qkv_gemm, qkv_gemm_reference, triton_usable
    from cqil_kernels.ops.qkv_gemm import qkv_gemm_triton

    assert triton_usable(device)
    x, nw, w, b = _inputs(2, 40, (12, 4, 4), 3, torch.float32, device)
    torch.testing.assert_close(qkv_gemm(x, nw, w, b, EPS), qkv_gemm_triton(x, nw, w, b, EPS), rtol=0, atol=0)
    if device == "cpu":  # without the interpreter the public op falls back to the reference
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not triton_usable("cpu")
        torch.testing.assert_close(qkv_gemm(x, nw, w, b, EPS), qkv_gemm_reference(x, nw, w, b, EPS),
                                   rtol=0, atol=0)


def test_qkv_gemm_opcheck(device):
    x, nw, w, b = _inputs(2, 40, (12, 4, 4), 2, torch.float32, device)
    torch.library.opcheck(torch.ops.cqil.qkv_gemm.default, (x, nw, w, b, EPS))
    torch.library.opcheck(torch.ops.cqil.qkv_gemm.default, (x, [], w[:3], [], EPS))


@pytest.mark.parametrize("H,parts,M,P", [
    (576, (576, 192, 192), 1, 2), (576, (576, 192, 192), 16, 4),        # SmolLM2-135M: 9 q + 2x3 kv heads of 64
    (4096, (4096, 4096, 4096), 1, 2), (4096, (4096, 4096, 4096), 16, 1),  # Llama-7B
])
def test_qkv_gemm_real_shapes_bf16(cuda_device, H, parts, M, P):
    _check(cuda_device, torch.bfloat16, M, H, parts, P, True, False, None)
