"""Split-K finishing: the last program of each tile reduces ("serial", one launch) or a second
reduction kernel does ("kernel"). Same partials, same order: the results must be identical, the
arrival counters must be back at zero, and "serial" must launch one kernel per GEMM."""

import pytest
import torch

from cqil_kernels.launches import LaunchCounter
from ops_testing import launch_config_for_test, layer_tensors, norm_weights, randn
from ops_testing import poisoned_workspaces  # noqa: F401  (fixture)

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poisoned_workspaces")]


def _cases(device, dtype=torch.float32, M=3, seed=0, H=97, I=71):
    """(name, call(split_k)) for every split-K GEMM op, on odd shapes."""
    from cqil_kernels.ops.batched_gemm import batched_gemm_triton
    from cqil_kernels.ops.down_sum import down_sum_triton
    from cqil_kernels.ops.gate_up import gate_up_silu_triton
    from cqil_kernels.ops.qkv_gemm import qkv_gemm_triton

    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: randn(*s, dtype=dtype, device=device, scale=scale, generator=g)  # noqa: E731
    lt = lambda *s, scale=1.0: layer_tensors(P, s, dtype, device, scale, g)  # noqa: E731  (one per layer)
    P, N = 3, 37
    parts = (N, 13, 13)
    x, nw = r(M, H, scale=3.0), norm_weights(P, H, dtype, device, g)
    w_qkv = [t for _ in range(P) for n in parts for t in layer_tensors(1, (n, H), dtype, device, 0.1, g)]
    b_qkv = [t for _ in range(P) for n in parts for t in layer_tensors(1, (n,), dtype, device, 1.0, g)]
    xo, wo, bo = r(P, M, H), lt(N, H, scale=0.1), lt(N)
    a, w_g, w_u, res = r(P, M, H), lt(I, H, scale=0.1), lt(I, H, scale=0.1), r(M, H, scale=3.0)
    mm, wd, attn = r(P, M, I), lt(H, I, scale=0.1), r(P, M, H)
    return [
        ("qkv_gemm", lambda k: qkv_gemm_triton(x, nw, w_qkv, b_qkv, 1e-6, split_k=k)),
        ("batched_gemm", lambda k: batched_gemm_triton(xo, wo, bo, split_k=k)),
        ("gate_up_silu", lambda k: gate_up_silu_triton(a, nw, w_g, w_u, 1e-6, res, 1, split_k=k)),
        ("down_sum", lambda k: down_sum_triton(mm, wd, res, attn, split_k=k)),
    ]


@pytest.mark.parametrize("op", ["qkv_gemm", "batched_gemm", "gate_up_silu", "down_sum"])
@pytest.mark.parametrize("M", [1, 3, 17])
def test_serial_and_kernel_reduction_agree(device, monkeypatch, op, M):
    from cqil_kernels.launch_config import use_launch_config
    from cqil_kernels.ops import _splitk

    call = dict(_cases(device, M=M))[op]
    with use_launch_config(splitk_mode="kernel"), LaunchCounter() as c_kernel:
        want = call(3)
    with use_launch_config(splitk_mode="serial"), LaunchCounter() as c_serial:
        got = call(3)
    assert c_kernel.triton_launches() == 2 and c_serial.triton_launches() == 1
    assert not torch.isnan(got).any()
    if device == "cpu":  # the interpreter runs the same fp32 adds in the same order
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not _splitk.tile_counters(got, 1).any(), "arrival counters were not reset"
    # and the unsplit kernel agrees within rounding
    torch.testing.assert_close(call(1), got, rtol=1e-4, atol=1e-4)


def test_counters_grow_and_stay_zero(device, monkeypatch):
    import gc
    import weakref

    from cqil_kernels.ops import _splitk

    monkeypatch.setattr(_splitk, "_COUNTERS", {})
    monkeypatch.setattr(_splitk, "_RETIRED", {})
    t = torch.empty(1, device=device)
    buf = _splitk.tile_counters(t, 10)
    assert buf.dtype == torch.int32 and buf.numel() >= 4096 and not buf.any()
    assert _splitk.tile_counters(t, 10) is buf
    old = weakref.ref(buf)
    big = _splitk.tile_counters(t, buf.numel() + 1)
    assert big.numel() > buf.numel() and not big.any()
    del buf
    gc.collect()
    # graphs captured with the old buffer still address it: it must not be freed
    assert old() is not None and any(b is old() for b in _splitk._RETIRED[t.device])
    assert _splitk.tile_counters(t, 1) is big


def test_reserve_takes_an_explicit_size(device, monkeypatch):
    from cqil_kernels.ops import _splitk

    monkeypatch.setattr(_splitk, "_COUNTERS", {})
    monkeypatch.setattr(_splitk, "_RETIRED", {})
    t = torch.empty(1, device=device)
    buf = _splitk.reserve_tile_counters(t.device, 10_000)
    assert buf.numel() == 10_000 and _splitk.tile_counters(t, 9_999) is buf
    assert _splitk.reserve_tile_counters(t.device, 5) is buf  # never shrinks
    assert _splitk.reserve_tile_counters(t.device).numel() == 10_000
    with pytest.raises(ValueError, match=">= 0"):
        _splitk.reserve_tile_counters(t.device, -1)
    with pytest.raises(TypeError, match="int"):
        _splitk.reserve_tile_counters(t.device, 3.5)


def test_growth_is_refused_during_graph_capture(device, monkeypatch):
    """Inside a capture the buffer cannot move; what the reserve holds is still handed out."""
    from cqil_kernels.ops import _splitk

    monkeypatch.setattr(_splitk, "_COUNTERS", {})
    monkeypatch.setattr(_splitk, "_RETIRED", {})
    t = torch.empty(1, device=device)
    buf = _splitk.reserve_tile_counters(t.device, 5000)
    monkeypatch.setattr(_splitk, "_capturing", lambda dev: True)
    assert _splitk.tile_counters(t, 5000) is buf
    with pytest.raises(RuntimeError, match=r"reserve_tile_counters\('cpu', 5001\)" if device == "cpu" else "reserve_tile_counters"):
        _splitk.tile_counters(t, 5001)
    assert _splitk.tile_counters(t, 1) is buf and not _splitk._RETIRED
    # and so is a first allocation
    monkeypatch.setattr(_splitk, "_COUNTERS", {})
    with pytest.raises(RuntimeError, match="CUDA graph is being captured"):
        _splitk.tile_counters(t, 1)


def test_engine_reserves_for_its_largest_attention(device, monkeypatch):
    """DecodeEngine reserves batch x layers x kv heads counters: a split decode attention over a
    group of every layer at the largest batch fits without growing during a capture."""
    import cqil_kernels as ck
    from cqil_kernels.ops import _splitk
    from tiny_models import make_tiny

    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_splitk, "_COUNTERS", {})
    monkeypatch.setattr(_splitk, "_RETIRED", {})
    monkeypatch.setattr(_splitk, "_RESERVED_TILES", 1)
    model = make_tiny("llama", num_layers=3).to(device)
    engine = ck.DecodeEngine(model, max_batch_size=5, max_length=16, backend="triton", cuda_graph=False)
    t = torch.empty(1, device=device)
    assert _splitk.tile_counters(t, 1).numel() == 5 * 3 * engine.num_kv_heads


@pytest.mark.parametrize("op", ["qkv_gemm", "batched_gemm", "gate_up_silu", "down_sum"])
def test_serial_split_k_is_deterministic_on_gpu(cuda_device, op):
    """A race in the last-arrival reduction shows up as a result that changes between runs."""
    from cqil_kernels.ops import _splitk

    # K spans several 128-wide blocks so the GPU tiles can split 8 ways
    call = dict(_cases(cuda_device, dtype=torch.bfloat16, M=1, H=1100, I=1030))[op]
    first = call(8).clone()
    for _ in range(200):
        assert torch.equal(call(8), first)
    torch.cuda.synchronize()
    assert not _splitk.tile_counters(first, 1).any()


@pytest.mark.parametrize("B,P,NH,NKV,D,S,L,holes,num_splits,live", [
    (2, 2, 4, 2, 16, 200, 170, True, 4, None),
    (1, 3, 6, 3, 8, 100, 100, False, 3, None),
    (3, 1, 2, 2, 24, 90, 40, True, 5, None),   # more splits asked than KV blocks: capped
    (2, 2, 4, 2, 16, 200, 200, True, 5, 50),   # live length on the device: 3 of 5 splits empty
])
def test_decode_attention_serial_and_kernel_combine_agree(device, monkeypatch, B, P, NH, NKV, D, S, L, holes, num_splits, live):
    from cqil_kernels.launch_config import use_launch_config
    from cqil_kernels.ops import _splitk
    from cqil_kernels.ops.decode_attention import decode_attention_triton
    from test_ops_decode_attention import _inputs

    q, ks, vs, mask = _inputs(B, P, NH, NKV, D, S, L, torch.float32, device, holes, shared=True)
    outs, launches = {}, {}
    for mode in ("kernel", "serial"):
        with use_launch_config(splitk_mode=mode), LaunchCounter() as c:
            last = None if live is None else torch.tensor([live - 1], device=device)
            outs[mode] = decode_attention_triton(q, ks, vs, mask, L, D ** -0.5, last, num_splits=num_splits)
        launches[mode] = c.triton_launches()
    assert launches == {"kernel": 2, "serial": 1}
    assert not torch.isnan(outs["serial"]).any()
    if device == "cpu":
        assert torch.equal(outs["serial"], outs["kernel"])
    else:
        torch.testing.assert_close(outs["serial"], outs["kernel"], rtol=1e-6, atol=1e-6)
    assert not _splitk.tile_counters(q, 1).any()


def test_serial_decode_attention_is_deterministic_on_gpu(cuda_device):
    from cqil_kernels.ops import _splitk
    from cqil_kernels.ops.decode_attention import decode_attention_triton
    from test_ops_decode_attention import _inputs

    q, ks, vs, mask = _inputs(2, 2, 9, 3, 64, 4096, 3000, torch.bfloat16, cuda_device, True, shared=True)
    first = decode_attention_triton(q, ks, vs, mask, 3000, 0.125).clone()
    for _ in range(200):
        assert torch.equal(decode_attention_triton(q, ks, vs, mask, 3000, 0.125), first)
    torch.cuda.synchronize()
    assert not _splitk.tile_counters(q, 1).any()


def test_reserved_counters_are_reused(device):
    """reserve_tile_counters allocates once; the ops then reuse that buffer (no allocation later,
    e.g. inside a CUDA-graph capture)."""
    from cqil_kernels.ops import _splitk

    t = torch.empty(1, device=device)
    _splitk.reserve_tile_counters(t.device)
    buf = _splitk.tile_counters(t, 1)
    assert buf.numel() >= _splitk._RESERVED_TILES
    call = dict(_cases(device))["down_sum"]
    call(3)
    assert _splitk.tile_counters(t, 1) is buf and not buf.any()


def test_convert_and_engine_reserve_counters_on_gpu(cuda_device, monkeypatch):
    import cqil_kernels as ck
    from cqil_kernels.ops import _splitk
    from tiny_models import make_tiny

    monkeypatch.setattr(_splitk, "_COUNTERS", {})
    model = make_tiny("llama").to(cuda_device)
    ck.convert(model, ck.CQILPlan(groups=[[1, 2]]), backend="triton")
    dev = torch.device("cuda", torch.cuda.current_device())
    assert dev in _splitk._COUNTERS
    monkeypatch.setattr(_splitk, "_COUNTERS", {})
    engine = ck.DecodeEngine(model, max_batch_size=3, max_length=16, backend="triton")
    assert _splitk._COUNTERS[dev].numel() >= 3 * engine.num_layers * engine.num_kv_heads


def test_captured_graph_survives_counter_growth_on_gpu(cuda_device, monkeypatch, request):
    """Capture a serial split GEMM, grow the counters, replay: the graph keeps using its (kept
    alive) buffer, gives the same result and leaves it zeroed; growing inside a capture raises."""
    import gc
    import weakref

    from cqil_kernels.ops import _splitk

    monkeypatch.setattr(_splitk, "_COUNTERS", {})
    monkeypatch.setattr(_splitk, "_RETIRED", {})
    launch_config_for_test(request, splitk_mode="serial")
    dev = torch.device("cuda", torch.cuda.current_device())
    _splitk.reserve_tile_counters(dev)
    call = dict(_cases(cuda_device, dtype=torch.bfloat16, M=1, H=1100, I=1030))["down_sum"]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        want = call(8).clone()  # JIT outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(8)
    old = weakref.ref(_splitk._COUNTERS[dev])
    old_ptr = old().data_ptr()
    grown = _splitk.reserve_tile_counters(dev, old().numel() * 4)
    assert grown.data_ptr() != old_ptr
    gc.collect()
    torch.cuda.empty_cache()
    # memory the allocator may hand out next: must not be written by the replays
    bait = [torch.full((old().numel(),), 7, dtype=torch.int32, device=dev) for _ in range(4)]
    assert old() is not None
    for _ in range(100):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    assert not old().any() and not grown.any()
    assert all((b == 7).all() for b in bait)
    with pytest.raises(RuntimeError, match="reserve_tile_counters"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            _splitk.tile_counters(out, grown.numel() + 1)
    assert _splitk._COUNTERS[dev] is grown
