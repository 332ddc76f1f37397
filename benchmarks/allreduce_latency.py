"""All-reduce latency of the backend at hand at CQIL's message sizes (one reduction per split group).

Messages are a group's output ``[tokens, H]``: decode (``B * H`` elements, B = 1..8) and prefill
(``tokens * H``), for H of SmolLM2-135M (576), Llama-7B (4096) and Llama-13B (5120). Every engine
is timed through ``cqil_kernels.distributed.Communicator`` (what the model runs) after a check that
it sums correctly; on CPU also the bare ``torch.distributed.all_reduce`` to show the wrapper's cost.

    # CPU: spawns W gloo processes itself
    python benchmarks/allreduce_latency.py --spawn 2 --out benchmarks/results/allreduce_gloo_cpu.json
    # GPUs: NCCL, symmetric-memory one-shot and two-shot (eager, and inside a CUDA graph)
    torchrun --standalone --nproc-per-node=2 benchmarks/allreduce_latency.py --out allreduce_h100.json

Per point: warm-up, then ``repeats`` timed runs of ``n`` back-to-back reductions (``n`` sized to
~``--budget-ms`` per run, the same on every rank); a run's time is the slowest rank's (all ranks
wait for the last); reported: median and best per-op microseconds. CUDA timings synchronize
before the clock stops. Rank 0 prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def message_sizes(hidden: list[int], batches: list[int], prefill_tokens: int) -> list[dict]:
    """The points: ``{"phase", "tokens", "hidden", "numel"}`` for decode batches and one prefill."""
    points = [{"phase": "decode", "tokens": b, "hidden": h, "numel": b * h} for h in hidden for b in batches]
    if prefill_tokens:
        points += [{"phase": "prefill", "tokens": prefill_tokens, "hidden": h, "numel": prefill_tokens * h}
                   for h in hidden]
    return points


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slowest(seconds: float, ctx) -> float:
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64, device=ctx.device if ctx.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.group)
    return float(t.item())


def _timed(op, n: int, device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(n):
        op()
    _sync(device)
    return time.perf_counter() - start


def _graph_op(op, n: int, device):
    """Capture ``n`` calls of ``op`` in one CUDA graph; returns the replay (the decode step's setting)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        op()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            op()
    return graph.replay


def measure_point(ctx, op, device, budget_ms: float, repeats: int, graph: bool) -> dict:
    """Median / best per-op microseconds of ``op`` (same ``n`` on every rank)."""
    import torch.distributed as dist

    for _ in range(3):
        op()
    probe = _slowest(_timed(op, 3, device), ctx) / 3
    n = int(min(5000, max(5, budget_ms / 1e3 / max(probe, 1e-7))))
    n_t = torch.tensor([n], dtype=torch.int64, device=ctx.device if ctx.backend == "nccl" else "cpu")
    dist.broadcast(n_t, src=0, group=ctx.group)  # every rank must run the same number of collectives
    n = int(n_t.item())
    run = _graph_op(op, n, device) if graph else None
    times = []
    for _ in range(repeats):
        dist.barrier(group=ctx.group)
        if run is None:
            elapsed = _timed(op, n, device)
        else:
            elapsed = _timed(run, 1, device)
        times.append(_slowest(elapsed, ctx) / n * 1e6)
    return {"us_median": statistics.median(times), "us_best": min(times), "ops_per_run": n, "repeats": repeats}


def engines_for(ctx) -> list[str]:
    if ctx.device.type == "cuda":
        return ["process_group", "symm_one_shot", "symm_two_shot"]
    return ["process_group", "raw torch.distributed"]


def run(ctx, args) -> dict:
    import torch.distributed as dist

    from cqil_kernels.distributed import Communicator, ReducePolicy

    points = message_sizes(args.hidden, args.batch, args.prefill_tokens)
    max_numel = max(p["numel"] for p in points)
    rows, skipped = [], []
    for engine in engines_for(ctx):
        for dname in args.dtypes:
            dtype = _DTYPES[dname]
            policy = ReducePolicy(engine="process_group" if engine.startswith("raw") else engine)
            comm = Communicator.from_context(ctx, policy)
            try:
                comm.prepare(max_numel, dtype)
            except ValueError as e:  # a forced symmetric engine that cannot run here: say so, go on
                skipped.append({"engine": engine, "dtype": dname, "reason": str(e)})
                continue
            for point in points:
                t = torch.full((point["numel"],), float(ctx.rank + 1), dtype=dtype, device=ctx.device)
                if engine.startswith("raw"):
                    def op(t=t):
                        dist.all_reduce(t, group=ctx.group)
                else:
                    def op(t=t, comm=comm):
                        comm.all_reduce_(t)
                # verify before timing: the sum of 1..W (exact in every dtype here)
                check = torch.full_like(t, float(ctx.rank + 1))
                (dist.all_reduce(check, group=ctx.group) if engine.startswith("raw") else comm.all_reduce_(check))
                want = ctx.world_size * (ctx.world_size + 1) / 2
                if not torch.equal(check, torch.full_like(check, want)):
                    raise RuntimeError(f"{engine} {dname} numel {point['numel']}: wrong sum")
                modes = [False, True] if (ctx.device.type == "cuda" and args.graph) else [False]
                for graph in modes:
                    res = measure_point(ctx, op, ctx.device, args.budget_ms, args.repeats, graph)
                    rows.append({**point, "dtype": dname, "bytes": point["numel"] * t.element_size(),
                                 "engine": engine, "cuda_graph": graph, **res})
    return {"rows": rows, "skipped": skipped}


def report(ctx, args, result, launch: str) -> None:
    from cqil_kernels.report import environment, format_table, write_json

    import torch.distributed as dist

    header = ["phase", "tokens", "H", "dtype", "KiB", "engine", "graph", "us median", "us best", "ops/run"]
    table = [[r["phase"], r["tokens"], r["hidden"], r["dtype"], round(r["bytes"] / 1024, 1), r["engine"],
              "yes" if r["cuda_graph"] else "no", round(r["us_median"], 1), round(r["us_best"], 1), r["ops_per_run"]]
             for r in result["rows"]]
    print(format_table(header, table))
    for s in result["skipped"]:
        print(f"skipped {s['engine']} {s['dtype']}: {s['reason']}")
    data = {
        "benchmark": "allreduce_latency",
        "environment": environment(ctx.device),
        "world_size": ctx.world_size,
        "backend": ctx.backend,
        "launch": launch,
        "torch_threads_per_rank": torch.get_num_threads(),
        # a shared machine: other work on the cores inflates host-side collectives
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "method": "median/best over repeats of the slowest rank's time per op for n back-to-back all-reduces "
                  "(n ~ budget); CUDA: synchronized; cuda_graph: n ops captured in one graph and replayed",
        "rows": result["rows"],
        "skipped": result["skipped"],
    }
    if dist.get_backend(ctx.group) == "gloo":
        data["note"] = (f"{ctx.world_size} gloo processes on {os.cpu_count()} CPU cores of one machine "
                        "(loopback TCP): the host-side cost of the collective, not a network or GPU figure")
    if args.out:
        print(f"wrote {write_json(data, args.out)}")


def _worker(rank: int, world_size: int, port: int, args) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    _main_in_rank(args, launch=f"spawn {world_size}")


def _main_in_rank(args, launch: str) -> None:
    from cqil_kernels.distributed import init

    torch.set_num_threads(args.threads)
    with init(backend=args.backend, timeout=args.timeout) as ctx:
        if not ctx.distributed:
            raise SystemExit("one process: nothing to reduce; use --spawn W or torchrun --nproc-per-node=W")
        result = run(ctx, args)
        if ctx.is_main:
            report(ctx, args, result, launch)


def parse_args(argv=None):
    def ints(text):
        return [int(v) for v in text.split(",") if v]

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spawn", type=int, default=0, metavar="W", help="start W local processes (CPU runs; not under torchrun)")
    p.add_argument("--backend", choices=["nccl", "gloo"], default=None)
    p.add_argument("--hidden", type=ints, default=[576, 4096, 5120])
    p.add_argument("--batch", type=ints, default=[1, 2, 4, 8])
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["bf16", "fp32"])
    p.add_argument("--budget-ms", type=float, default=100.0, help="time per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--graph", action="store_true", help="CUDA: also time inside a CUDA graph")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    bad = [d for d in args.dtypes if d not in _DTYPES]
    if bad:
        p.error(f"unknown dtypes {bad}; choose from {sorted(_DTYPES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.spawn:
        if "RANK" in os.environ:
            raise SystemExit("--spawn starts its own processes; under torchrun leave it out")
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(args.spawn, port, args), nprocs=args.spawn, join=True)
        return 0
    _main_in_rank(args, launch="torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "environment")
    return 0


if __name__ == "__main__":
    sys.exit(main())
