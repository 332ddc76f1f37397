"""batched_gemm: per-layer GEMM over a group (o_proj), real Triton kernel (interpreter on CPU)."""

import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from ops_testing import CPU_DTYPES, LAYOUTS, assert_error_budget, hi_dtype, layer_tensors, nan_empty, randn, upcast
from ops_testing import poisoned_workspaces  # noqa: F401  (fixture)

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poisoned_workspaces")]


def _inputs(P, M, K, N, dtype, device, bias=True, seed=0, strided=False, layout="separate"):
    g = torch.Generator().manual_seed(seed)
    if strided:  # layer-major view of an [M, P, K] buffer: x[p] rows are P*K apart
        x = randn(M, P, K, dtype=dtype, device=device, generator=g).transpose(0, 1)
    else:
        x = randn(P, M, K, dtype=dtype, device=device, generator=g)
    w = layer_tensors(P, (N, K), dtype, device, K ** -0.5, g, layout)
    b = layer_tensors(P, (N,), dtype, device, 1.0, g, layout) if bias else None
    return x, w, b


def _check(device, dtype, P, M, K, N, bias, split_k, strided=False, seed=0, layout="separate"):
    from cqil_kernels.ops.batched_gemm import batched_gemm_reference, batched_gemm_triton

    x, w, b = _inputs(P, M, K, N, dtype, device, bias, seed, strided, layout)
    out = nan_empty((P, M, N), dtype, device)
    assert batched_gemm_triton(x, w, b, out=out, split_k=split_k) is out
    hi = hi_dtype(dtype)
    ref_hi = batched_gemm_reference(upcast(x, hi), upcast(w, hi), upcast(b, hi))
    assert_error_budget(out, ref_hi, batched_gemm_reference(x, w, b))


CASES = [  # P, M, K, N, bias, split_k, layout of the per-layer weights
    (1, 1, 63, 7, False, None, "separate"),
    (2, 1, 96, 40, True, 3, "separate"),
    (3, 3, 70, 33, False, 2, "unaligned"),
    (4, 16, 33, 20, True, None, "views"),
    (2, 33, 40, 36, True, 1, "separate"),
    (4, 3, 129, 7, False, 4, "unaligned"),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("P,M,K,N,bias,split_k,layout", CASES)
def test_batched_gemm_matches_reference(device, dtype, P, M, K, N, bias, split_k, layout):
    _check(device, dtype, P, M, K, N, bias, split_k, layout=layout)


@pytest.mark.parametrize("split_k", [1, 2])
def test_batched_gemm_bf16_upcast_and_strided(device, split_k):
    _check(device, torch.bfloat16, 3, 5, 45, 24, True, split_k, strided=True)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    P=st.integers(1, 4), M=st.integers(1, 40), K=st.integers(1, 100), N=st.integers(1, 40),
    bias=st.booleans(), split_k=st.integers(1, 4), dtype=st.sampled_from(CPU_DTYPES),
    seed=st.integers(0, 2**16), layout=st.sampled_from(LAYOUTS),
)
def test_batched_gemm_fuzz(device, P, M, K, N, bias, split_k, dtype, seed, layout):
    _check(device, dtype, P, M, K, N, bias, split_k, seed=seed, layout=layout)


def test_batched_gemm_rejects_mismatched_lists(device):
    from cqil_kernels.ops import batched_gemm

    x, w, b = _inputs(2, 3, 40, 12, torch.float32, device)
    with pytest.raises(ValueError, match="one weight per layer"):
        batched_gemm(x, w[:1])
    with pytest.raises(ValueError, match="one layout"):
        batched_gemm(x, [w[0], w[1].t().contiguous().t()])


def test_batched_gemm_opcheck(device):
    x, w, b = _inputs(2, 3, 40, 12, torch.float32, device)
    torch.library.opcheck(torch.ops.cqil.batched_gemm.default, (x, w, b))
    torch.library.opcheck(torch.ops.cqil.batched_gemm.default, (x, w, []))


def test_batched_gemm_compiles_fullgraph(device):
    """The custom op is one opaque node: fullgraph compile must not break on it."""
    if device == "cpu" and shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler for inductor's CPU backend")
    from cqil_kernels.ops import batched_gemm

    x, w, b = _inputs(2, 3, 40, 12, torch.float32, device)

    def f(x, w, b):
        return batched_gemm(x, w, b) * 2.0

    torch._dynamo.reset()
    try:
        compiled = torch.compile(f, fullgraph=True)
        got = compiled(x, w, b)
    except Exception as e:  # a missing/broken CPU toolchain is an environment problem
        if "compil" in str(e).lower() and device == "cpu" and "cqil" not in str(e):
            pytest.skip(f"inductor CPU toolchain unavailable: {e}")
        raise
    torch.testing.assert_close(got, f(x, w, b))


@pytest.mark.parametrize("K,N,M,P", [
    (576, 576, 1, 2), (576, 576, 16, 4),        # SmolLM2-135M o_proj
    (4096, 4096, 1, 2), (4096, 4096, 16, 1),    # Llama-7B o_proj
])
def test_batched_gemm_real_shapes_bf16(cuda_device, K, N, M, P):
    _check(cuda_device, torch.bfloat16, P, M, K, N, False, None)
