"""GPU-only checks of the distributed engines; every test skips cleanly without CUDA (run with
``pytest --device cuda``). On one GPU: a one-rank NCCL group exercises symmetric-memory buffers
and graph capture; two gloo ranks share the GPU (NCCL refuses two ranks on one GPU). With two or
more GPUs: NCCL and symmetric memory across ranks, eager and captured."""

import pytest
import torch

from distributed_harness import run_ranks


def _symmetric_one_rank(ctx):
    """The real SymmetricBuffers on a one-rank NCCL group (the Communicator of one rank is the identity)."""
    import torch.distributed as dist

    from cqil_kernels.distributed.symmetric import SymmetricBuffers, probe

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=dev)
    try:
        out = {"probe": probe(dev).available}
        if not out["probe"]:
            out["reason"] = probe(dev).reason
            return out
        bufs = SymmetricBuffers(dist.group.WORLD, dev)
        try:
            bufs.reserve(1 << 18, torch.bfloat16)
        except Exception as e:  # noqa: BLE001 - report, the test decides
            out["reserve_error"] = f"{type(e).__name__}: {e}"
            return out
        out["capacity"] = bufs.capacity(torch.bfloat16)
        x = torch.randn(8, 4096, device=dev, dtype=torch.bfloat16)
        ref = x.clone()
        out["one_shot_ok"] = torch.equal(bufs.one_shot_(x), ref)  # one rank: the sum is the tensor itself
        out["two_shot_ok"] = torch.equal(bufs.two_shot_(x), ref)
        static = torch.zeros_like(ref)
        s = torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):
            bufs.one_shot_(static)
        torch.cuda.current_stream(dev).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            bufs.one_shot_(static)
            bufs.two_shot_(static)
        static.copy_(ref)
        graph.replay()
        torch.cuda.synchronize(dev)
        out["graph_ok"] = torch.equal(static, ref)
        return out
    finally:
        dist.destroy_process_group()


def test_symmetric_buffers_and_capture_on_one_gpu(cuda_device):
    out = run_ranks(_symmetric_one_rank, 1, pg_timeout=60.0, join_timeout=180.0)[0]
    if not out["probe"]:
        pytest.skip(f"symmetric memory unavailable: {out['reason']}")
    assert "reserve_error" not in out, out.get("reserve_error")
    assert out["capacity"] == 1 << 18
    assert out["one_shot_ok"] and out["two_shot_ok"] and out["graph_ok"]


def _prepare_in_capture(ctx):
    from cqil_kernels.distributed import Communicator

    comm = Communicator(None, "cuda:0")
    graph = torch.cuda.CUDAGraph()
    x = torch.ones(4, device="cuda:0")
    with torch.cuda.graph(graph):
        x.mul_(2)
        try:
            comm.prepare(1024, torch.bfloat16)
            return "allowed"
        except RuntimeError as e:
            return str(e)


def test_prepare_is_refused_during_capture(cuda_device):
    msg = run_ranks(_prepare_in_capture, 1, join_timeout=120.0)[0]
    assert "during CUDA-graph capture" in msg


def _gloo_on_cuda(ctx):
    from cqil_kernels.distributed import Communicator

    comm = Communicator.from_context(ctx)
    x = torch.full((4, 576), float(ctx.rank + 1), device=ctx.device)
    comm.all_reduce_(x)
    g = comm.all_gather(torch.full((1, 8), float(ctx.rank), device=ctx.device))
    return {"device": str(x.device), "sum": x.unique().tolist(), "gather": g[:, 0].tolist()}


def test_two_gloo_ranks_share_one_gpu(cuda_device):
    out = run_ranks(_gloo_on_cuda, 2, backend="gloo", device="cuda:0", pg_timeout=30.0, join_timeout=180.0)
    for o in out:
        assert o == {"device": "cuda:0", "sum": [3.0], "gather": [0.0, 1.0]}


def _nccl_ranks(ctx):
    from cqil_kernels.distributed import Communicator, ReducePolicy

    out = {}
    for engine in ("process_group", "symm_one_shot", "symm_two_shot", "auto"):
        comm = Communicator.from_context(ctx, ReducePolicy(engine=engine))
        try:
            comm.prepare(1 << 20, torch.bfloat16)
        except ValueError as e:  # forced symmetric engine unavailable here
            out[engine] = f"unavailable: {e}"
            continue
        x = torch.full((8, 4096), float(ctx.rank + 1), device=ctx.device, dtype=torch.bfloat16)
        comm.all_reduce_(x)
        h = comm.all_reduce_async_(torch.ones(4096, device=ctx.device, dtype=torch.bfloat16))
        # every rank captures the same sequence, then replays it
        static = torch.zeros(8, 4096, device=ctx.device, dtype=torch.bfloat16)
        side = torch.cuda.Stream(ctx.device)
        side.wait_stream(torch.cuda.current_stream(ctx.device))
        with torch.cuda.stream(side):
            comm.all_reduce_(static)
        torch.cuda.current_stream(ctx.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            comm.all_reduce_(static)
        static.fill_(float(ctx.rank + 1))
        graph.replay()
        torch.cuda.synchronize(ctx.device)
        out[engine] = {"sum": x.unique().tolist(), "async": h.wait().unique().tolist(),
                       "graph": static.unique().tolist(), "engine": comm.engine_for(x).engine}
    return out


def test_nccl_and_symmetric_memory_across_gpus(cuda_device):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 or more GPUs")
    world = 2
    out = run_ranks(_nccl_ranks, world, backend="nccl", pg_timeout=60.0, join_timeout=300.0)
    want = world * (world + 1) / 2
    for o in out:
        assert o["process_group"]["engine"] == "process_group"
        for engine in ("process_group", "symm_one_shot", "symm_two_shot", "auto"):
            if engine == "process_group" or isinstance(o[engine], dict):
                res = o[engine]
                assert res["sum"] == [want] and res["graph"] == [want] and res["async"] == [float(world)]
