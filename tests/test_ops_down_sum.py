"""down_sum: one GEMM over the K-concatenation of P down-projections + residual/attention epilogue."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from ops_testing import CPU_DTYPES, LAYOUTS, assert_error_budget, hi_dtype, layer_tensors, nan_empty, randn, upcast
from ops_testing import poisoned_workspaces  # noqa: F401  (fixture)

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poisoned_workspaces")]


def _inputs(P, M, I, H, dtype, device, attn=True, seed=0, strided=False, layout="separate"):
    g = torch.Generator().manual_seed(seed)
    m = randn(P, M, I, dtype=dtype, device=device, generator=g)
    w = layer_tensors(P, (H, I), dtype, device, (P * I) ** -0.5, g, layout)
    if strided:  # residual as a transposed view: column-major [M, H]
        res = randn(H, M, dtype=dtype, device=device, generator=g).t()
    else:
        res = randn(M, H, dtype=dtype, device=device, generator=g)
    a = randn(P, M, H, dtype=dtype, device=device, generator=g) if attn else None
    return m, w, res, a


def _check(device, dtype, P, M, I, H, attn, split_k, strided=False, seed=0, layout="separate", residual=True):
    from cqil_kernels.ops.down_sum import down_sum_reference, down_sum_triton

    m, w, res, a = _inputs(P, M, I, H, dtype, device, attn, seed, strided, layout)
    if not residual:  # a rank's share of a group: the delta only
        res = None
    out = nan_empty((M, H), dtype, device)
    assert down_sum_triton(m, w, res, a, out=out, split_k=split_k) is out
    hi = hi_dtype(dtype)
    ref_hi = down_sum_reference(upcast(m, hi), upcast(w, hi), upcast(res, hi), upcast(a, hi))
    assert_error_budget(out, ref_hi, down_sum_reference(m, w, res, a))


CASES = [  # P, M, I, H, attn, split_k, layout of the per-layer weights, residual
    (1, 1, 63, 7, False, None, "separate", True),
    (2, 1, 40, 40, True, 3, "separate", True),   # I=40: a K tile straddles no layer boundary (masked per layer)
    (3, 3, 33, 33, True, 2, "unaligned", False),
    (4, 16, 20, 36, False, None, "views", True),
    (2, 33, 36, 20, True, 1, "separate", False),
    (4, 3, 7, 69, True, 4, "unaligned", True),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("P,M,I,H,attn,split_k,layout,residual", CASES)
def test_down_sum_matches_reference(device, dtype, P, M, I, H, attn, split_k, layout, residual):
    _check(device, dtype, P, M, I, H, attn, split_k, layout=layout, residual=residual)


@pytest.mark.parametrize("split_k", [1, 3])
def test_down_sum_bf16_upcast_and_strided(device, split_k):
    _check(device, torch.bfloat16, 3, 5, 45, 24, True, split_k, strided=True)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    P=st.integers(1, 4), M=st.integers(1, 40), I=st.integers(1, 80), H=st.integers(1, 40),
    attn=st.booleans(), split_k=st.integers(1, 5), dtype=st.sampled_from(CPU_DTYPES),
    seed=st.integers(0, 2**16), layout=st.sampled_from(LAYOUTS), residual=st.booleans(),
)
def test_down_sum_fuzz(device, P, M, I, H, attn, split_k, dtype, seed, layout, residual):
    _check(device, dtype, P, M, I, H, attn, split_k, seed=seed, layout=layout, residual=residual)


def test_down_sum_rejects_mismatched_lists(device):
    from cqil_kernels.ops import down_sum

    m, w, res, a = _inputs(2, 3, 40, 12, torch.float32, device)
    with pytest.raises(ValueError, match="one \\[H, I\\] weight per layer"):
        down_sum(m, w[:1], res, a)
    with pytest.raises(ValueError, match="residual must be"):
        down_sum(m, w, res[:, :5], a)


def test_down_sum_opcheck(device):
    m, w, res, a = _inputs(2, 3, 40, 12, torch.float32, device)
    torch.library.opcheck(torch.ops.cqil.down_sum.default, (m, w, res, a))
    torch.library.opcheck(torch.ops.cqil.down_sum.default, (m, w, res, None))
    torch.library.opcheck(torch.ops.cqil.down_sum.default, (m, w, None, a))


@pytest.mark.parametrize("I,H,M,P", [
    (1536, 576, 1, 2), (1536, 576, 16, 4),      # SmolLM2-135M
    (11008, 4096, 1, 2), (11008, 4096, 16, 1),  # Llama-7B
])
def test_down_sum_real_shapes_bf16(cuda_device, I, H, M, P):
    _check(cuda_device, torch.bfloat16, P, M, I, H, True, None)
