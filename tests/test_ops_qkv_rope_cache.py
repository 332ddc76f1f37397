"""qkv_rope_cache: group QKV GEMM + q/k norm + RoPE + KV-cache write (real Triton kernels; interpreter on CPU)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from ops_testing import CPU_DTYPES, assert_error_budget, hi_dtype, layer_tensors, nan_empty, norm_weights, randn, upcast
from ops_testing import poisoned_workspaces  # noqa: F401  (fixture)

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poisoned_workspaces")]

EPS, QK_EPS = 1e-6, 1e-5


def _rope_tables(M, D, dtype, device, g):
    # HF layout: the angle table repeated over the two halves; random positions per row
    pos = torch.randint(0, 500, (M, 1), generator=g).double()
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.cat([pos * inv, pos * inv], dim=-1)
    return ang.cos().to(device=device, dtype=dtype), ang.sin().to(device=device, dtype=dtype)


def _inputs(B, T, H, nh, nkv, D, P, L, S, dtype, device, bias, qk_norm, seed, cache_strided=False):
    g = torch.Generator().manual_seed(seed)
    M = B * T
    x = randn(M, H, dtype=dtype, device=device, scale=3.0, generator=g)
    nw = norm_weights(P, H, dtype, device, g)
    parts = (nh * D, nkv * D, nkv * D)
    w = [t for _ in range(P) for n in parts for t in layer_tensors(1, (n, H), dtype, device, H ** -0.5, g)]
    b = [t for _ in range(P) for n in parts for t in layer_tensors(1, (n,), dtype, device, 1.0, g)] if bias else None
    cos, sin = _rope_tables(M, D, dtype, device, g)
    qn = norm_weights(P, D, dtype, device, g) if qk_norm else None
    kn = norm_weights(P, D, dtype, device, g) if qk_norm else None
    shape = (L, B + 1, nkv, S, D)  # one spare batch row: must stay untouched
    if cache_strided:  # every other slot of a longer buffer
        kc = randn(L, B + 1, nkv, 2 * S, D, dtype=dtype, device=device, generator=g)[:, :, :, ::2]
        vc = randn(L, B + 1, nkv, 2 * S, D, dtype=dtype, device=device, generator=g)[:, :, :, ::2]
    else:
        kc = randn(*shape, dtype=dtype, device=device, generator=g)
        vc = randn(*shape, dtype=dtype, device=device, generator=g)
    return x, nw, w, b, cos, sin, qn, kn, kc, vc


def _check(device, dtype, B, T, H, nh, nkv, D, P, layer0, slot0, bias, qk_norm, split_k, seed=0, cache_strided=False):
    from cqil_kernels.ops.qkv_rope_cache import qkv_rope_cache_reference, qkv_rope_cache_triton

    L, S = layer0 + P + 1, slot0 + T + 2
    x, nw, w, b, cos, sin, qn, kn, kc, vc = _inputs(B, T, H, nh, nkv, D, P, L, S, dtype, device, bias, qk_norm,
                                                    seed, cache_strided)
    slot = torch.tensor([slot0], device=device)
    M = B * T
    kc0, vc0 = kc.clone(), vc.clone()
    out = nan_empty((M, P * nh, D), dtype, device)
    res = qkv_rope_cache_triton(x, nw, w, b, EPS, cos, sin, qn, kn, QK_EPS, kc, vc, layer0, slot, T, nh,
                                out=out, split_k=split_k)
    assert res is out

    hi = hi_dtype(dtype)
    kc_hi, vc_hi = kc0.to(hi), vc0.to(hi)
    q_hi = qkv_rope_cache_reference(*upcast([x, nw, w, b], hi), EPS, *upcast([cos, sin, qn, kn], hi), QK_EPS,
                                    kc_hi, vc_hi, layer0, slot, T, nh)
    kc_lo, vc_lo = kc0.clone(), vc0.clone()
    q_lo = qkv_rope_cache_reference(x, nw, w, b, EPS, cos, sin, qn, kn, QK_EPS, kc_lo, vc_lo, layer0, slot, T, nh)
    assert_error_budget(out, q_hi, q_lo)
    written = (slice(layer0, layer0 + P), slice(0, B), slice(None), slice(slot0, slot0 + T))
    for got, ref_hi, ref_lo, before in ((kc, kc_hi, kc_lo, kc0), (vc, vc_hi, vc_lo, vc0)):
        assert_error_budget(got[written], ref_hi[written], ref_lo[written])
        untouched = torch.ones(got.shape, dtype=torch.bool)
        untouched[written] = False
        assert torch.equal(got[untouched], before[untouched]), "the kernel wrote outside its cache slots"


CASES = [  # B, T, H, nh, nkv, D, P, layer0, slot0, bias, qk_norm, split_k
    (1, 1, 63, 3, 1, 8, 1, 0, 0, False, False, None),
    (2, 1, 40, 4, 2, 16, 2, 1, 5, True, False, 3),
    (3, 1, 33, 2, 2, 14, 3, 2, 1, False, True, 2),    # D/2 = 7: masked half-head
    (1, 3, 70, 6, 2, 8, 4, 0, 4, True, True, 1),      # several tokens per sequence (prefill-style)
    (2, 2, 45, 4, 1, 16, 2, 3, 0, True, False, None),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("B,T,H,nh,nkv,D,P,layer0,slot0,bias,qk_norm,split_k", CASES)
def test_qkv_rope_cache_matches_reference(device, dtype, B, T, H, nh, nkv, D, P, layer0, slot0, bias, qk_norm, split_k):
    _check(device, dtype, B, T, H, nh, nkv, D, P, layer0, slot0, bias, qk_norm, split_k)


@pytest.mark.parametrize("split_k", [1, 2])
def test_qkv_rope_cache_bf16_and_strided_cache(device, split_k):
    _check(device, torch.bfloat16, 2, 1, 45, 4, 2, 16, 2, 1, 3, True, True, split_k, cache_strided=True)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 3), T=st.integers(1, 3), H=st.integers(1, 80), nkv=st.integers(1, 3), group=st.integers(1, 3),
    half=st.integers(1, 9), P=st.integers(1, 4), layer0=st.integers(0, 2), slot0=st.integers(0, 6),
    bias=st.booleans(), qk_norm=st.booleans(), split_k=st.integers(1, 4), dtype=st.sampled_from(CPU_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_qkv_rope_cache_fuzz(device, B, T, H, nkv, group, half, P, layer0, slot0, bias, qk_norm, split_k, dtype, seed):
    _check(device, dtype, B, T, H, nkv * group, nkv, 2 * half, P, layer0, slot0, bias, qk_norm, split_k, seed)


def test_qkv_rope_cache_matches_hf_rotary_and_group_projection(device):
    """The reference is the composition the group uses: qkv_gemm, HF's apply_rotary_pos_emb, cache slots."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from cqil_kernels.ops import qkv_gemm_reference, qkv_rope_cache

    B, H, nh, nkv, D, P = 2, 48, 4, 2, 16, 2
    x, nw, w, b, cos, sin, _, _, kc, vc = _inputs(B, 1, H, nh, nkv, D, P, P, 4, torch.float32, device, True, False, 1)
    slot = torch.tensor([2], device=device)
    q = qkv_rope_cache(x, nw, w, b, EPS, cos, sin, None, None, 0.0, kc, vc, 0, slot, 1, nh)
    qkv = qkv_gemm_reference(x, nw, w, b, EPS).view(B, 1, P, nh + 2 * nkv, D)
    q_ref = qkv[..., :nh, :].reshape(B, 1, P * nh, D).transpose(1, 2)
    k_ref = qkv[..., nh:nh + nkv, :].reshape(B, 1, P * nkv, D).transpose(1, 2)
    q_ref, k_ref = apply_rotary_pos_emb(q_ref, k_ref, cos[:, None], sin[:, None])
    torch.testing.assert_close(q, q_ref[:, :, 0], rtol=1e-5, atol=1e-5)
    for j in range(P):
        torch.testing.assert_close(kc[j, :B, :, 2], k_ref[:, j * nkv:(j + 1) * nkv, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vc[j, :B, :, 2], qkv[:, 0, j, nh + nkv:].reshape(B, nkv, D), rtol=1e-5, atol=1e-5)


def test_qkv_rope_cache_opcheck(device):
    x, nw, w, b, cos, sin, qn, kn, kc, vc = _inputs(2, 1, 24, 2, 1, 8, 2, 3, 4, torch.float32, device, True, True, 2)
    slot = torch.tensor([1], device=device)
    torch.library.opcheck(torch.ops.cqil.qkv_rope_cache.default,
                          (x, nw, w, b, EPS, cos, sin, qn, kn, QK_EPS, kc, vc, 1, slot, 1, 2))


@pytest.mark.parametrize("change,match", [
    (dict(layer0=3), "outside the cache"),
    (dict(num_heads=3), "q, k, v per layer"),
    (dict(tokens_per_seq=4), "whole sequences"),
    (dict(slot=torch.tensor([1, 2])), "one integer"),
    (dict(cos=torch.zeros(2, 6)), "cos/sin"),
    (dict(q_norms=[torch.ones(8), torch.ones(8)]), "given together"),
])
def test_qkv_rope_cache_errors(device, change, match):
    from cqil_kernels.ops import qkv_rope_cache

    x, nw, w, b, cos, sin, _, _, kc, vc = _inputs(2, 1, 24, 2, 1, 8, 2, 4, 4, torch.float32, device, True, False, 3)
    args = dict(x=x, norm_weights=nw, weights=w, biases=b, eps=EPS, cos=cos, sin=sin, q_norms=None, k_norms=None,
                qk_eps=QK_EPS, k_cache=kc, v_cache=vc, layer0=1, slot=torch.tensor([0]), tokens_per_seq=1, num_heads=2)
    args.update(change)
    before = kc.clone()
    with pytest.raises(ValueError, match=match):
        qkv_rope_cache(**args)
    assert torch.equal(kc, before)


@pytest.mark.parametrize("H,nh,nkv,D,P,B", [(576, 9, 3, 64, 2, 1), (4096, 32, 32, 128, 2, 8), (576, 9, 3, 64, 4, 8)])
def test_qkv_rope_cache_real_shapes_bf16(cuda_device, H, nh, nkv, D, P, B):
    _check(cuda_device, torch.bfloat16, B, 1, H, nh, nkv, D, P, 3, 17, False, False, None)


def test_qkv_rope_cache_offsets_past_int32(device):
    """Cache offsets are 64-bit: batch row b of a cache whose batch stride is 2^30 elements lies
    past 2^31 (Llama-7B sizes at B*S ~ 512k). The storage is allocated but never touched beyond
    the written slots, so the test costs virtual address space, not memory."""
    if device != "cpu":
        pytest.skip("CPU interpreter check (its int32 arithmetic wraps like the GPU's)")
    from cqil_kernels.ops.qkv_rope_cache import qkv_rope_cache_triton

    B, H, nh, nkv, D, P, S = 3, 24, 2, 1, 8, 1, 4
    x, nw, w, b, cos, sin, _, _, kc_small, vc_small = _inputs(B, 1, H, nh, nkv, D, P, 1, S, torch.float16, device,
                                                              False, False, 4)
    stride_b = 1 << 30
    try:
        storage_k = torch.empty(stride_b * (B - 1) + nkv * S * D, dtype=torch.float16)
        storage_v = torch.empty_like(storage_k)
    except RuntimeError as e:  # no address space for 2 x 4 GiB of virtual memory
        pytest.skip(f"cannot reserve the large cache: {e}")
    strides = (stride_b * B, stride_b, S * D, D, 1)
    kc = storage_k.as_strided((1, B, nkv, S, D), strides)
    vc = storage_v.as_strided((1, B, nkv, S, D), strides)
    slot = torch.tensor([2])
    qkv_rope_cache_triton(x, nw, w, b, EPS, cos, sin, None, None, QK_EPS, kc, vc, 0, slot, 1, nh)
    kr, vr = kc_small[:1, :B].clone(), vc_small[:1, :B].clone()
    from cqil_kernels.ops.qkv_rope_cache import qkv_rope_cache_reference

    qkv_rope_cache_reference(x, nw, w, b, EPS, cos, sin, None, None, QK_EPS, kr, vr, 0, slot, 1, nh)
    for got, ref in ((kc, kr), (vc, vr)):
        torch.testing.assert_close(got[0, :, :, 2], ref[0, :, :, 2], rtol=2e-3, atol=2e-3)
