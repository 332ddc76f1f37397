"""Smoke test of a multi-process launch: collectives, consistency and liveness on every rank.

    torchrun --standalone --nproc-per-node=2 -m cqil_kernels.distributed.selftest

Each rank checks all-reduce (sync and async), all-gather and broadcast against the one-process
arithmetic, the start-up consistency check and a liveness barrier; the ranks agree on the
outcome and rank 0 alone prints one JSON line. Exit status 0 when every check passed on every
rank, 1 otherwise (2: bad arguments). Without torchrun it runs as one process.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .communicator import Communicator
from .consistency import check_consistent, fingerprint
from .faults import check_alive
from .launch import DEFAULT_TIMEOUT_S, init


def run_checks(ctx) -> dict[str, bool]:
    """The checks on one rank; ``{name: passed}`` (the same names on every rank)."""
    comm = Communicator.from_context(ctx)
    w, r, dev = ctx.world_size, ctx.rank, ctx.device
    checks = {}

    x = torch.arange(6, dtype=torch.float32, device=dev) + r
    comm.all_reduce_(x)
    # sum over ranks of (i + r) = W*i + W(W-1)/2, exact in fp32 for these small integers
    expected = w * torch.arange(6, dtype=torch.float32, device=dev) + w * (w - 1) / 2
    checks["all_reduce"] = torch.equal(x, expected)

    y = torch.full((4, 3), 0.25 * (r + 1), dtype=torch.bfloat16, device=dev)
    z = y.clone()
    comm.all_reduce_async_(y).wait()
    comm.all_reduce_(z)
    checks["all_reduce_async_equals_sync"] = torch.equal(y, z)

    g = comm.all_gather(torch.full((2, 3), float(r), device=dev))
    checks["all_gather"] = torch.equal(g, torch.arange(w, device=dev, dtype=torch.float32).repeat_interleave(2)[:, None].expand(-1, 3))

    b = torch.full((3,), float(r), device=dev)
    comm.broadcast_(b, src=0)
    checks["broadcast"] = torch.equal(b, torch.zeros(3, device=dev))

    check_consistent(fingerprint(world_size=w, extra={"selftest": "collectives v1"}), ctx.group, r, ctx.timeout_s)
    checks["consistency"] = True
    check_alive(ctx.group, ctx.timeout_s, r)
    checks["alive"] = True
    return checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cqil_kernels.distributed.selftest", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["nccl", "gloo"], default=None, help="default: NCCL on CUDA, gloo on CPU")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="process-group timeout, seconds")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cuda:LOCAL_RANK or cpu)")
    args = parser.parse_args(argv)
    try:
        ctx = init(backend=args.backend, timeout=args.timeout, device=args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with ctx:
        checks = run_checks(ctx)
        passed = all(checks.values())
        if ctx.distributed:  # every rank must agree before rank 0 reports
            flag = torch.tensor([int(passed)], dtype=torch.int32,
                                device=ctx.device if ctx.backend == "nccl" else "cpu")
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=ctx.group)
            passed = bool(flag.item())
        if ctx.is_main:
            print(json.dumps({"world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device),
                              "timeout_s": ctx.timeout_s, "checks": checks, "all_ranks_passed": passed}))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
