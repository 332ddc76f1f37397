"""gate_up_silu: per-layer RMSNorm + gate/up GEMM + SiLU*up (real Triton kernel; interpreter on CPU)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from ops_testing import (
    CPU_DTYPES, assert_error_budget, hi_dtype, nan_empty, norm_weight, randn, upcast,
)
from ops_testing import poisoned_workspaces  # noqa: F401  (fixture)

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poisoned_workspaces")]

EPS = 1e-5


def _inputs(P, M, H, I, dtype, device, norm=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = randn(P, M, H, dtype=dtype, device=device, scale=3.0, generator=g)
    nw = norm_weight(P, H, dtype, device, g) if norm else None
    w = randn(P, 2 * I, H, dtype=dtype, device=device, scale=H ** -0.5, generator=g)
    return u, nw, w


def _check(device, dtype, P, M, H, I, norm, split_k, seed=0):
    from cqil_kernels.ops.gate_up import gate_up_silu_reference, gate_up_silu_triton

    u, nw, w = _inputs(P, M, H, I, dtype, device, norm, seed)
    out = nan_empty((P, M, I), dtype, device)
    assert gate_up_silu_triton(u, nw, w, EPS, out=out, split_k=split_k) is out
    hi = hi_dtype(dtype)
    ref_hi = gate_up_silu_reference(upcast(u, hi), upcast(nw, hi), upcast(w, hi), EPS)
    assert_error_budget(out, ref_hi, gate_up_silu_reference(u, nw, w, EPS))


CASES = [  # P, M, H, I, norm, split_k
    (1, 1, 63, 7, True, None),
    (2, 1, 96, 40, True, 3),
    (3, 3, 70, 33, False, 2),
    (4, 16, 33, 20, True, None),
    (2, 33, 40, 36, True, 1),
    (4, 3, 129, 7, True, 4),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("P,M,H,I,norm,split_k", CASES)
def test_gate_up_silu_matches_reference(device, dtype, P, M, H, I, norm, split_k):
    _check(device, dtype, P, M, H, I, norm, split_k)


@pytest.mark.parametrize("split_k", [1, 2])
def test_gate_up_silu_bf16_upcast(device, split_k):
    _check(device, torch.bfloat16, 3, 5, 45, 24, True, split_k)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    P=st.integers(1, 4), M=st.integers(1, 40), H=st.integers(1, 100), I=st.integers(1, 40),
    norm=st.booleans(), split_k=st.integers(1, 4), dtype=st.sampled_from(CPU_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_gate_up_silu_fuzz(device, P, M, H, I, norm, split_k, dtype, seed):
    _check(device, dtype, P, M, H, I, norm, split_k, seed=seed)


def test_gate_up_silu_opcheck(device):
    u, nw, w = _inputs(2, 3, 40, 12, torch.float32, device)
    torch.library.opcheck(torch.ops.cqil.gate_up_silu.default, (u, nw, w, EPS))
    torch.library.opcheck(torch.ops.cqil.gate_up_silu.default, (u, None, w, EPS))


@pytest.mark.parametrize("H,I,M,P", [
    (576, 1536, 1, 2), (576, 1536, 16, 4),      # SmolLM2-135M
    (4096, 11008, 1, 2), (4096, 11008, 16, 1),  # Llama-7B
])
def test_gate_up_silu_real_shapes_bf16(cuda_device, H, I, M, P):
    _check(cuda_device, torch.bfloat16, P, M, H, I, True, None)
