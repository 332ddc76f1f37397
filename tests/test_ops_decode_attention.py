"""decode_attention: split-KV attention of P layers over their own caches (GQA per layer)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from ops_testing import CPU_DTYPES, assert_error_budget, hi_dtype, max_err, nan_empty, randn, upcast
from ops_testing import poisoned_workspaces  # noqa: F401  (fixture)

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poisoned_workspaces")]


def _inputs(B, P, NH, NKV, D, S, L, dtype, device, holes=False, shared=False, seed=0):
    """q and P caches; slots >= L hold NaN (must never be read), masked holes hold NaN in V."""
    g = torch.Generator().manual_seed(seed)
    q = randn(B, P * NH, D, dtype=dtype, device=device, generator=g)
    if shared:  # P equally strided views of one buffer (the no-copy path)
        kb = randn(P, B, NKV, S, D, dtype=dtype, device=device, generator=g)
        vb = randn(P, B, NKV, S, D, dtype=dtype, device=device, generator=g)
        ks, vs = list(kb.unbind(0)), list(vb.unbind(0))
    else:
        ks = [randn(B, NKV, S, D, dtype=dtype, device=device, generator=g) for _ in range(P)]
        vs = [randn(B, NKV, S, D, dtype=dtype, device=device, generator=g) for _ in range(P)]
    for c in ks + vs:
        c[:, :, L:] = float("nan")
    mask = None
    if holes:
        mask = (torch.rand(B, S, generator=g) > 0.3).to(device)
        mask[:, 0] = False
        mask[:, min(1, L - 1)] = True  # at least one valid slot per row
        for c in vs:
            c.masked_fill_(~mask[:, None, :, None], float("nan"))
    return q, ks, vs, mask


def _check(device, dtype, B, P, NH, NKV, D, S, L, holes, shared, num_splits, seed=0, mask=None):
    from cqil_kernels.ops.decode_attention import decode_attention_reference, decode_attention_triton

    q, ks, vs, m = _inputs(B, P, NH, NKV, D, S, L, dtype, device, holes, shared, seed)
    mask = m if mask is None else mask.to(device)
    scale = D ** -0.5
    out = nan_empty((B, P * NH, D), dtype, device)
    assert decode_attention_triton(q, ks, vs, mask, L, scale, out=out, num_splits=num_splits) is out
    hi = hi_dtype(dtype)
    ref_hi = decode_attention_reference(upcast(q, hi), upcast(ks, hi), upcast(vs, hi), mask, L, scale)
    assert_error_budget(out, ref_hi, decode_attention_reference(q, ks, vs, mask, L, scale))
    return out


CASES = [  # B, P, NH, NKV (GQA ratio NH/NKV), D, S, L, holes, shared, num_splits
    (1, 1, 2, 2, 12, 40, 33, False, False, None),  # ratio 1, odd head dim, L < S
    (2, 2, 4, 2, 16, 70, 70, True, True, 3),       # ratio 2, views of one buffer, holes
    (3, 3, 3, 1, 20, 50, 41, True, False, 2),      # ratio 3, separate tensors (stacked)
    (1, 4, 6, 2, 8, 20, 1, False, True, 1),        # ratio 3, a single valid slot
    (2, 4, 4, 4, 16, 100, 97, True, False, 4),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("B,P,NH,NKV,D,S,L,holes,shared,num_splits", CASES)
def test_decode_attention_matches_reference(device, dtype, B, P, NH, NKV, D, S, L, holes, shared, num_splits):
    _check(device, dtype, B, P, NH, NKV, D, S, L, holes, shared, num_splits)


def test_decode_attention_bf16_upcast(device):
    _check(device, torch.bfloat16, 2, 2, 4, 2, 16, 70, 65, True, True, 3)


def test_decode_attention_fully_masked_split_and_row(device):
    """Split 0 sees only masked slots (no NaN may leak from it); batch row 1 has no valid slot at
    all and must come out as zeros."""
    B, S, L = 2, 96, 90
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, 40:] = True  # interpreter chunk is 32: the first split of row 0 is fully masked
    out = _check(device, torch.float32, B, 2, 2, 1, 16, S, L, False, True, 3, mask=mask)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()


def test_decode_attention_view_path_does_not_copy():
    from cqil_kernels.ops.decode_attention import _layer_addressing

    buf = torch.randn(3, 2, 2, 10, 8)
    caches = list(buf.unbind(0))
    base, layer_stride, strides = _layer_addressing(caches, 10)
    assert base.data_ptr() == buf.data_ptr() and layer_stride == buf.stride(0)
    assert tuple(strides) == caches[0].stride()
    # reversed order: a negative but constant layer stride is still a view
    base, layer_stride, _ = _layer_addressing(caches[::-1], 10)
    assert base.data_ptr() == caches[2].data_ptr() and layer_stride == -buf.stride(0)
    # unrelated tensors: stacked copy of the live prefix only
    sep = [torch.randn(2, 2, 10, 8) for _ in range(3)]
    base, layer_stride, strides = _layer_addressing(sep, 7)
    assert base.shape == (3, 2, 2, 7, 8) and layer_stride == base.stride(0)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 3), P=st.integers(1, 4), NKV=st.integers(1, 2), ratio=st.integers(1, 3),
    D=st.sampled_from([8, 12, 16, 24]), S=st.integers(1, 80), data=st.data(),
    holes=st.booleans(), shared=st.booleans(), num_splits=st.integers(1, 4),
    dtype=st.sampled_from(CPU_DTYPES), seed=st.integers(0, 2**16),
)
def test_decode_attention_fuzz(device, B, P, NKV, ratio, D, S, data, holes, shared, num_splits, dtype, seed):
    L = data.draw(st.integers(1, S))
    _check(device, dtype, B, P, NKV * ratio, NKV, D, S, L, holes, shared, num_splits, seed=seed)


def test_decode_attention_dispatch_and_opcheck(device, monkeypatch):
    from cqil_kernels.ops import decode_attention, decode_attention_reference

    q, ks, vs, mask = _inputs(2, 2, 4, 2, 16, 40, 37, torch.float32, device, holes=True, shared=True)
    for c in ks + vs:  # opcheck compares against itself; NaN slots would fail the comparison
        c.nan_to_num_(0.0)
    out = decode_attention(q, ks, vs, mask, 37, 0.25)
    ref = decode_attention_reference(q, ks, vs, mask, 37, 0.25)
    assert max_err(out, ref) < 1e-5
    torch.library.opcheck(torch.ops.cqil.decode_attention.default, (q, ks, vs, mask, 37, 0.25))
    torch.library.opcheck(torch.ops.cqil.decode_attention.default, (q, ks, vs, None, 20, 0.25))
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        torch.testing.assert_close(decode_attention(q, ks, vs, mask, 37, 0.25), ref, rtol=0, atol=0)


def _check_live(device, dtype, B, P, NH, NKV, D, S, live, holes, shared, num_splits, seed=0):
    """kv_len = S (static, as under a CUDA graph), the live length ``live`` given on the device as
    last_pos = live - 1; every slot from ``live`` on holds NaN in K and V and is admitted by the
    mask, so only last_pos keeps it out. The result must equal attention over the live prefix."""
    from cqil_kernels.ops.decode_attention import decode_attention_reference, decode_attention_triton

    q, ks, vs, m = _inputs(B, P, NH, NKV, D, S, S, dtype, device, holes, shared, seed)
    for c in ks + vs:
        c[:, :, live:] = float("nan")
    mask = torch.ones(B, S, dtype=torch.bool, device=device) if m is None else m.clone()
    mask[:, live:] = True  # (_inputs keeps slot 1 attended, and holes' V is NaN)
    last = torch.tensor([live - 1], device=device)
    scale = D ** -0.5
    out = nan_empty((B, P * NH, D), dtype, device)
    assert decode_attention_triton(q, ks, vs, mask, S, scale, last, out=out, num_splits=num_splits) is out
    hi = hi_dtype(dtype)
    # the independent answer: attention over the live prefix only
    prefix = decode_attention_reference(upcast(q, hi), upcast(ks, hi), upcast(vs, hi), mask, live, scale)
    assert_error_budget(out, prefix, decode_attention_reference(q, ks, vs, mask, live, scale))
    # and the reference applies last_pos the same way (as a device-side mask)
    ref = decode_attention_reference(upcast(q, hi), upcast(ks, hi), upcast(vs, hi), mask, S, scale, last)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ref, prefix)  # same sums up to summation order
    return out


LIVE_CASES = [  # B, P, NH, NKV, D, S, live, holes, shared, num_splits
    (1, 2, 4, 2, 16, 200, 37, False, True, 4),     # several splits past the live length
    (2, 3, 3, 1, 12, 130, 64, True, False, 3),     # live ends on a block edge; separate caches
    (2, 1, 2, 2, 8, 100, 99, True, True, 1),       # one split (direct store)
    (1, 4, 6, 2, 8, 160, 1, False, True, 5),       # a single live slot
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("B,P,NH,NKV,D,S,live,holes,shared,num_splits", LIVE_CASES)
def test_decode_attention_reads_only_the_live_length(device, dtype, B, P, NH, NKV, D, S, live, holes, shared, num_splits):
    _check_live(device, dtype, B, P, NH, NKV, D, S, live, holes, shared, num_splits)


@pytest.mark.parametrize("mode", ["serial", "kernel"])
def test_decode_attention_loads_nothing_past_last_pos(device, monkeypatch, request, mode):
    """Count, under the interpreter, which K/V cache slots the kernel loads: none at or after the
    live length, although kv_len (and the grid) cover the whole static cache."""
    from triton.runtime import interpreter

    from cqil_kernels.ops.decode_attention import decode_attention_triton
    from ops_testing import launch_config_for_test

    if device != "cpu":
        pytest.skip("counts the interpreter's loads")
    launch_config_for_test(request, splitk_mode=mode)
    B, P, NH, NKV, D, S, live = 2, 2, 4, 2, 16, 256, 70
    q, ks, vs, _ = _inputs(B, P, NH, NKV, D, S, S, torch.float32, device, shared=True)
    kbuf, vbuf = ks[0], vs[0]  # views of [P, B, NKV, S, D] buffers: layer 0 at the lowest address
    es = kbuf.element_size()
    slots = {}

    def loaded_slots(ptrs, mask, base):
        addr = ptrs.data[mask.data].astype("int64") - base
        inside = (addr >= 0) & (addr < P * B * NKV * S * D * es)
        return ((addr[inside] // es) // D) % S

    original = interpreter.interpreter_builder.create_masked_load

    def counting_load(ptrs, mask, other, *rest):
        for name, base in (("k", kbuf.data_ptr()), ("v", vbuf.data_ptr())):
            slots.setdefault(name, []).extend(loaded_slots(ptrs, mask, base).tolist())
        return original(ptrs, mask, other, *rest)

    monkeypatch.setattr(interpreter.interpreter_builder, "create_masked_load", counting_load)
    decode_attention_triton(q, ks, vs, None, S, D ** -0.5, torch.tensor([live - 1]), num_splits=8)
    monkeypatch.undo()
    for name in ("k", "v"):
        seen = slots[name]
        assert seen and max(seen) == live - 1, (name, max(seen))
        assert sorted(set(seen)) == list(range(live))


def test_decode_attention_last_pos_edges(device):
    from cqil_kernels.ops import decode_attention
    from cqil_kernels.ops.decode_attention import decode_attention_reference

    q, ks, vs, _ = _inputs(1, 2, 4, 2, 16, 40, 40, torch.float32, device, shared=True)
    # nothing live: zeros, like a fully masked row
    none = decode_attention(q, ks, vs, None, 40, 0.25, torch.tensor([-1], device=device))
    assert (none == 0).all()
    # a last_pos past kv_len is clamped to kv_len
    past = decode_attention(q, ks, vs, None, 30, 0.25, torch.tensor([99], device=device, dtype=torch.int32))
    assert max_err(past, decode_attention_reference(q, ks, vs, None, 30, 0.25)) < 1e-5
    for bad in (torch.tensor([3.0], device=device), torch.tensor([1, 2], device=device)):
        with pytest.raises(ValueError, match="last_pos"):
            decode_attention(q, ks, vs, None, 40, 0.25, bad)
    torch.library.opcheck(torch.ops.cqil.decode_attention.default,
                          (q, ks, vs, None, 40, 0.25, torch.tensor([20], device=device)))


@pytest.mark.parametrize("B,P,NH,NKV,D,S,L", [
    (1, 2, 9, 3, 64, 2048, 1500),   # SmolLM2-135M, static cache longer than kv_len
    (4, 4, 9, 3, 64, 512, 512),
    (1, 2, 32, 32, 128, 4096, 4000),  # Llama-7B
])
@pytest.mark.parametrize("shared", [False, True])
def test_decode_attention_real_shapes_bf16(cuda_device, B, P, NH, NKV, D, S, L, shared):
    _check(cuda_device, torch.bfloat16, B, P, NH, NKV, D, S, L, True, shared, None)


@pytest.mark.parametrize("B,P,NH,NKV,D,S,live", [
    (1, 2, 9, 3, 64, 4160, 300),    # SmolLM2-135M, ctx 256 in a 4k static cache
    (8, 1, 32, 32, 128, 2112, 2000),  # Llama-7B, nearly full
])
def test_decode_attention_live_length_real_shapes_bf16(cuda_device, B, P, NH, NKV, D, S, live):
    _check_live(cuda_device, torch.bfloat16, B, P, NH, NKV, D, S, live, True, True, None)
