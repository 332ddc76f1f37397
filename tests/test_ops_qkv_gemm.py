"""qkv_gemm: fused per-layer RMSNorm + QKV GEMM of P layers (real Triton kernel; interpreter on CPU)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from ops_testing import (
    CPU_DTYPES, assert_error_budget, hi_dtype, nan_empty, norm_weight, randn, upcast,
)
from ops_testing import poisoned_workspaces  # noqa: F401  (fixture)

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poisoned_workspaces")]

EPS = 1e-6


def _inputs(M, H, N, P, dtype, device, norm=True, bias=True, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # every other column of a wider buffer: non-unit stride along K
        x = randn(M, 2 * H, dtype=dtype, device=device, scale=3.0, generator=g)[:, ::2]
    else:
        x = randn(M, H, dtype=dtype, device=device, scale=3.0, generator=g)
    nw = norm_weight(P, H, dtype, device, g) if norm else None
    w = randn(P * N, H, dtype=dtype, device=device, scale=H ** -0.5, generator=g)
    b = randn(P * N, dtype=dtype, device=device, generator=g) if bias else None
    return x, nw, w, b


def _check(device, dtype, M, H, N, P, norm, bias, split_k, strided=False, seed=0):
    from cqil_kernels.ops.qkv_gemm import qkv_gemm_reference, qkv_gemm_triton

    x, nw, w, b = _inputs(M, H, N, P, dtype, device, norm, bias, seed, strided)
    # without a norm the P layers are one plain GEMM over the concatenated weight
    out = nan_empty((M, P * N), dtype, device)
    res = qkv_gemm_triton(x, nw, w, b, EPS, out=out, split_k=split_k)
    assert res is out
    hi = hi_dtype(dtype)
    ref_hi = qkv_gemm_reference(upcast(x, hi), upcast(nw, hi), upcast(w, hi), upcast(b, hi), EPS)
    ref_lo = qkv_gemm_reference(x, nw, w, b, EPS)
    assert_error_budget(out, ref_hi, ref_lo)


CASES = [  # M, H (=K), N per layer, P, norm, bias, split_k (None: heuristic)
    (1, 63, 7, 1, True, False, None),
    (1, 96, 40, 2, True, True, 3),
    (3, 70, 33, 3, True, False, 2),
    (16, 33, 20, 4, False, True, None),
    (33, 40, 36, 2, True, True, 1),
    (3, 129, 7, 4, True, True, 4),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("M,H,N,P,norm,bias,split_k", CASES)
def test_qkv_gemm_matches_reference(device, dtype, M, H, N, P, norm, bias, split_k):
    _check(device, dtype, M, H, N, P, norm, bias, split_k)


@pytest.mark.parametrize("split_k", [1, 2])
def test_qkv_gemm_bf16_upcast_and_strided(device, split_k):
    _check(device, torch.bfloat16, 3, 45, 24, 2, True, True, split_k, strided=True)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    M=st.integers(1, 40), H=st.integers(1, 100), N=st.integers(1, 40), P=st.integers(1, 4),
    norm=st.booleans(), bias=st.booleans(), split_k=st.integers(1, 4),
    dtype=st.sampled_from(CPU_DTYPES), seed=st.integers(0, 2**16),
)
def test_qkv_gemm_fuzz(device, M, H, N, P, norm, bias, split_k, dtype, seed):
    _check(device, dtype, M, H, N, P, norm, bias, split_k, seed=seed)


def test_qkv_gemm_dispatch(device, monkeypatch):
    from cqil_kernels.ops import qkv_gemm, qkv_gemm_reference, triton_usable
    from cqil_kernels.ops.qkv_gemm import qkv_gemm_triton

    assert triton_usable(device)
    x, nw, w, b = _inputs(2, 40, 12, 3, torch.float32, device)
    torch.testing.assert_close(qkv_gemm(x, nw, w, b, EPS), qkv_gemm_triton(x, nw, w, b, EPS), rtol=0, atol=0)
    if device == "cpu":  # without the interpreter the public op falls back to the reference
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not triton_usable("cpu")
        torch.testing.assert_close(qkv_gemm(x, nw, w, b, EPS), qkv_gemm_reference(x, nw, w, b, EPS),
                                   rtol=0, atol=0)


def test_qkv_gemm_opcheck(device):
    x, nw, w, b = _inputs(2, 40, 12, 2, torch.float32, device)
    torch.library.opcheck(torch.ops.cqil.qkv_gemm.default, (x, nw, w, b, EPS))
    torch.library.opcheck(torch.ops.cqil.qkv_gemm.default, (x, None, w, None, EPS))


@pytest.mark.parametrize("H,N,M,P", [
    (576, 960, 1, 2), (576, 960, 16, 4),        # SmolLM2-135M: 9 q + 2x3 kv heads of 64
    (4096, 12288, 1, 2), (4096, 12288, 16, 1),  # Llama-7B
])
def test_qkv_gemm_real_shapes_bf16(cuda_device, H, N, M, P):
    _check(cuda_device, torch.bfloat16, M, H, N, P, True, False, None)
