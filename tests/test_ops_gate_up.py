"""gate_up_silu: per-layer RMSNorm + gate/up GEMM + SiLU*up (real Triton kernel; interpreter on CPU)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from ops_testing import (
    CPU_DTYPES, LAYOUTS, assert_error_budget, hi_dtype, layer_tensors, nan_empty, norm_weights, randn, upcast,
)
from ops_testing import poisoned_workspaces  # noqa: F401  (fixture)

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poisoned_workspaces")]

EPS = 1e-5


def _inputs(P, M, H, I, dtype, device, norm=True, seed=0, layout="separate", context=0):
    g = torch.Generator().manual_seed(seed)
    u = randn(context + P, M, H, dtype=dtype, device=device, scale=3.0, generator=g)
    nw = norm_weights(P, H, dtype, device, g, layout) if norm else None
    gw = layer_tensors(P, (I, H), dtype, device, H ** -0.5, g, layout)
    uw = layer_tensors(P, (I, H), dtype, device, H ** -0.5, g, layout)
    return u, nw, gw, uw


def _check(device, dtype, P, M, H, I, norm, split_k, seed=0, residual=False, bypass=0, strided=False,
           layout="separate", context=0):
    """residual: u holds attention outputs and the kernel forms h + a_j (+ bypass) itself;
    context: u's first entries are earlier layers' outputs (bypass terms only)."""
    from cqil_kernels.ops.gate_up import gate_up_silu_reference, gate_up_silu_triton

    u, nw, gw, uw = _inputs(P, M, H, I, dtype, device, norm, seed, layout, context)
    g = torch.Generator().manual_seed(seed + 1)
    res = randn(M, H, dtype=dtype, device=device, scale=3.0, generator=g) if residual else None
    if strided:  # [P, M, H] as a transposed view of [M, P, H] (the engine's attention layout)
        u = u.transpose(0, 1).contiguous().transpose(0, 1)
    out = nan_empty((P, M, I), dtype, device)
    assert gate_up_silu_triton(u, nw, gw, uw, EPS, res, bypass, context, out=out, split_k=split_k) is out
    hi = hi_dtype(dtype)
    ref_hi = gate_up_silu_reference(upcast(u, hi), upcast(nw, hi), upcast(gw, hi), upcast(uw, hi), EPS,
                                    upcast(res, hi), bypass, context)
    assert_error_budget(out, ref_hi, gate_up_silu_reference(u, nw, gw, uw, EPS, res, bypass, context))


CASES = [  # P, M, H, I, norm, split_k, layout of the per-layer weights
    (1, 1, 63, 7, True, None, "separate"),
    (2, 1, 96, 40, True, 3, "separate"),
    (3, 3, 70, 33, False, 2, "unaligned"),
    (4, 16, 33, 20, True, None, "views"),
    (2, 33, 40, 36, True, 1, "separate"),
    (4, 3, 129, 7, True, 4, "unaligned"),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("P,M,H,I,norm,split_k,layout", CASES)
def test_gate_up_silu_matches_reference(device, dtype, P, M, H, I, norm, split_k, layout):
    _check(device, dtype, P, M, H, I, norm, split_k, layout=layout)


@pytest.mark.parametrize("split_k", [1, 2])
def test_gate_up_silu_bf16_upcast(device, split_k):
    _check(device, torch.bfloat16, 3, 5, 45, 24, True, split_k)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    P=st.integers(1, 4), M=st.integers(1, 40), H=st.integers(1, 100), I=st.integers(1, 40),
    norm=st.booleans(), split_k=st.integers(1, 4), dtype=st.sampled_from(CPU_DTYPES),
    seed=st.integers(0, 2**16), layout=st.sampled_from(LAYOUTS),
)
def test_gate_up_silu_fuzz(device, P, M, H, I, norm, split_k, dtype, seed, layout):
    _check(device, dtype, P, M, H, I, norm, split_k, seed=seed, layout=layout)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("P,M,H,I,bypass,split_k,strided", [
    (1, 1, 63, 7, 0, None, False),
    (2, 3, 40, 36, 1, 2, True),
    (3, 1, 70, 33, 2, 3, False),
    (4, 16, 33, 20, 1, 1, True),
    (4, 5, 129, 7, 3, 4, False),
])
def test_gate_up_silu_forms_mlp_input_with_bypass(device, dtype, P, M, H, I, bypass, split_k, strided):
    _check(device, dtype, P, M, H, I, True, split_k, residual=True, bypass=bypass, strided=strided)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(P=st.integers(1, 4), M=st.integers(1, 20), H=st.integers(1, 70), I=st.integers(1, 30), data=st.data(),
       split_k=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_gate_up_silu_residual_fuzz(device, P, M, H, I, data, split_k, seed):
    context = data.draw(st.integers(0, 2))
    bypass = data.draw(st.integers(0, P + context - 1))
    _check(device, torch.float32, P, M, H, I, True, split_k, seed=seed, residual=True, bypass=bypass,
           context=context)


@pytest.mark.parametrize("P,context,bypass,split_k", [(1, 1, 1, None), (2, 2, 1, 2), (1, 3, 3, 3), (2, 1, 2, 1)])
def test_gate_up_silu_context_entries_feed_only_the_bypass(device, P, context, bypass, split_k):
    """A rank holding the last P layers of a group gets the earlier layers' attention outputs as
    context: its MLP inputs equal those of the whole group's computation, for its layers."""
    from cqil_kernels.ops.gate_up import mlp_inputs_reference

    _check(device, torch.float32, P, 3, 40, 12, True, split_k, residual=True, bypass=bypass, context=context)
    h, a = torch.randn(3, 5, dtype=torch.float64), torch.randn(context + P, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(mlp_inputs_reference(h, a, bypass, context), mlp_inputs_reference(h, a, bypass)[context:])


def test_gate_up_silu_mlp_input_reference_is_the_group_semantics():
    """u_j = h + a_j + sum_{i=1..min(d, j)} a_{j-i} (design.md section 1)."""
    from cqil_kernels.ops.gate_up import mlp_inputs_reference

    h, a = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 3, 5, dtype=torch.float64)
    for d in range(4):
        want = torch.stack([h + sum(a[j - i] for i in range(min(d, j) + 1)) for j in range(4)])
        torch.testing.assert_close(mlp_inputs_reference(h, a, d), want)


@pytest.mark.parametrize("residual_shape,bypass,match", [((3, 7), 0, "residual must be"), ((3, 40), 2, "bypass"),
                                                         (None, 1, "bypass")])
def test_gate_up_silu_residual_errors(device, residual_shape, bypass, match):
    from cqil_kernels.ops import gate_up_silu

    u, nw, gw, uw = _inputs(2, 3, 40, 12, torch.float32, device)
    res = None if residual_shape is None else torch.zeros(residual_shape, device=device)
    with pytest.raises(ValueError, match=match):
        gate_up_silu(u, nw, gw, uw, EPS, res, bypass)


def test_gate_up_silu_rejects_mismatched_lists(device):
    from cqil_kernels.ops import gate_up_silu

    u, nw, gw, uw = _inputs(2, 3, 40, 12, torch.float32, device)
    with pytest.raises(ValueError, match="one \\[I, H\\] weight per layer"):
        gate_up_silu(u, nw, gw[:1], uw, EPS)
    with pytest.raises(ValueError, match="context"):
        gate_up_silu(u, nw[:1], gw[:1], uw[:1], EPS, None, 0, 1)  # context needs a residual


def test_gate_up_silu_opcheck(device):
    u, nw, gw, uw = _inputs(2, 3, 40, 12, torch.float32, device)
    torch.library.opcheck(torch.ops.cqil.gate_up_silu.default, (u, nw, gw, uw, EPS))
    torch.library.opcheck(torch.ops.cqil.gate_up_silu.default, (u, [], gw, uw, EPS))
    torch.library.opcheck(torch.ops.cqil.gate_up_silu.default, (u, nw, gw, uw, EPS, u[0].clone(), 1))
    torch.library.opcheck(torch.ops.cqil.gate_up_silu.default, (u, nw[:1], gw[:1], uw[:1], EPS, u[0].clone(), 1, 1))


@pytest.mark.parametrize("H,I,M,P", [
    (576, 1536, 1, 2), (576, 1536, 16, 4),      # SmolLM2-135M
    (4096, 11008, 1, 2), (4096, 11008, 16, 1),  # Llama-7B
])
def test_gate_up_silu_real_shapes_bf16(cuda_device, H, I, M, P):
    _check(cuda_device, torch.bfloat16, P, M, H, I, True, None)
