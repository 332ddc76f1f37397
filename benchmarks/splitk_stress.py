"""Serial split-K / split-KV under CUDA-graph replay at real decode shapes (a GPU check).

For every op of the decode step (``bench_kernels.CASES``) at M = 1 on SmolLM2-135M and Llama-7B
shapes, group sizes P in {1, 2, 4}:

1. the op runs eagerly with ``splitk_mode="kernel"`` (a separate reduction launch: the same
   partial sums in the same order, the reference for the serial path);
2. it is captured in a CUDA graph with ``splitk_mode="serial"`` and NaN-poisoned workspaces
   (``poison_workspaces``: the fill is captured too, so every replay starts from NaN partials);
3. the graph is replayed ``--replays`` times (1000); after each replay the output must equal the
   first replay's, bit for bit;
4. the counters are then grown (a larger reservation: the graph must keep its own, kept-alive
   buffer) and the graph replayed ``--replays`` times more, with the same requirement;
5. at the end every counter buffer must be zero and the output free of NaN and within one ulp
   (at the output's scale) of the "kernel" result; whether it is bitwise equal is recorded.

Each (shape, P, op) is one JSONL row (``--jsonl``), status "ok" or "fail". ``--dry-run``: tiny
shapes on the CPU through the interpreter, eager calls instead of graph replays (checks the script).

    python benchmarks/splitk_stress.py --jsonl /tmp/stress.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _tensors(out):
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return [out]


def _counters_zero() -> bool:
    from cqil_kernels.ops import _splitk

    bufs = list(_splitk._COUNTERS.values()) + [b for bs in _splitk._RETIRED.values() for b in bs]
    return all(not bool(b.any()) for b in bufs)


def _split_launches(fn, copy):
    """(reduction/combine launches of the op in "kernel" mode: > 0 means it splits at this shape,
    its outputs)."""
    from cqil_kernels.launch_config import use_launch_config
    from cqil_kernels.launches import LaunchCounter

    with use_launch_config(splitk_mode="kernel"), LaunchCounter() as c:
        want = fn(copy)
    n = sum(v for k, v in c.by_name.items() if "_splitk_reduce_kernel" in k or "_decode_combine_kernel" in k)
    return n, [t.clone() for t in _tensors(want)]


def stress_case(case, replays: int, device: str) -> dict:
    """Steps 1-5 of the module docstring for one case; returns the row (without status)."""
    from cqil_kernels.launch_config import use_launch_config

    copy = case.make()
    fused = case.impls["triton_fused"]
    reductions, want = _split_launches(fused, copy)
    with use_launch_config(splitk_mode="serial"):
        return _stress_serial(fused, copy, want, reductions, replays, device)


def _stress_serial(fused, copy, want, reductions, replays: int, device: str) -> dict:
    import torch

    from cqil_kernels.ops import _splitk
    mismatches = torch.zeros((), dtype=torch.int64, device=device)
    if device == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fused(copy)  # JIT outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = _tensors(fused(copy))
        replay = graph.replay
    else:  # the interpreter: eager calls, fresh outputs each time
        outs = []

        def replay():
            outs[:] = _tensors(fused(copy))
    replay()
    first = [t.clone() for t in outs]
    for _ in range(replays):
        replay()
        for t, f in zip(outs, first):
            mismatches += (t != f).any()
    grown_from = max((b.numel() for b in _splitk._COUNTERS.values()), default=0)
    dev = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    _splitk.reserve_tile_counters(dev, grown_from + _splitk._RESERVED_TILES)  # grows: a new buffer
    for _ in range(replays):
        replay()
        for t, f in zip(outs, first):
            mismatches += (t != f).any()
    if device == "cuda":
        torch.cuda.synchronize()
    nan = any(bool(torch.isnan(t).any()) for t in outs if t.is_floating_point())
    diff = max(float((t.double() - w.double()).abs().max()) if t.numel() else 0.0 for t, w in zip(outs, want))
    row = dict(split_launches_in_kernel_mode=reductions, replays=2 * replays, mismatching_replays=int(mismatches),
               counters_zero=_counters_zero(), output_nan=nan, max_diff_vs_kernel_mode=diff,
               counters_grown_from=grown_from, counters_now=int(_splitk._COUNTERS[dev].numel()))
    # the two finishes add the same partials in the same order, but their epilogues are different
    # kernels (FMA contraction may differ): allow one ulp of the output at its scale
    scale = max(float(w.abs().max()) if w.numel() else 0.0 for w in want)
    one_ulp = max(torch.finfo(t.dtype).eps for t in outs if t.is_floating_point()) * max(scale, 1e-6)
    row.update(bitwise_equal_kernel_mode=diff == 0.0, ulp_at_scale=one_ulp)
    row["passed"] = row["mismatching_replays"] == 0 and row["counters_zero"] and not nan and diff <= one_ulp
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jsonl", default=None)
    ap.add_argument("--step", default="splitk-stress")
    ap.add_argument("--replays", type=int, default=None, help="replays before and after the growth (default 1000; dry run 2)")
    ap.add_argument("--P", nargs="*", type=int, default=None, help="group sizes (default 1 2 4; dry run 1 2)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU through the interpreter")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before cqil_kernels.ops decorates its kernels
    for p in (ROOT, HERE):
        if p not in sys.path:
            sys.path.insert(0, p)
    import torch

    import bench_kernels as bk
    from cqil_kernels.launch_config import heuristic_config, use_launch_config
    from cqil_kernels.ops._splitk import reserve_tile_counters
    from step_log import StepLog

    log = StepLog(args.jsonl, args.step)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("splitk_stress.py: no CUDA device (use --dry-run)", file=sys.stderr)
        return 2
    models = bk.SMOKE_MODELS if args.dry_run else bk.MODELS
    replays = args.replays if args.replays is not None else (2 if args.dry_run else 1000)
    Ps = args.P or ([1, 2] if args.dry_run else [1, 2, 4])
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    # dry run: the GPU's split decisions (132 SMs; tiny shapes still split: BK 32)
    with use_launch_config(heuristic_config("interpreter", sm_count=132) if args.dry_run else None,
                            poison_workspaces=True):
        reserve_tile_counters(torch.device(device, 0) if device == "cuda" else device)
        failed = _run_cases(bk, models, Ps, dtype, device, replays, log)
    log.emit("done" if not failed else "fail", dict(kind="summary", failed=failed))
    return 1 if failed else 0


def _run_cases(bk, models, Ps, dtype, device, replays, log) -> int:
    import torch

    failed = 0
    for model, cfg in models.items():
        for case in bk.cases(model, cfg, [1], Ps, dtype, device):
            base = dict(model=model, op=case.op, M=case.M, P=case.P, dtype=str(dtype).removeprefix("torch."))
            try:
                row = dict(base, **stress_case(case, replays, device))
                status = "ok" if row["passed"] else "fail"
            except Exception as e:  # noqa: BLE001 - a row, and the next case
                row, status = dict(base, passed=False, error=f"{type(e).__name__}: {e}"[:500]), "error"
            failed += status != "ok"
            log.emit(status, row)
            what = row.get("error") or (f"splits={row['split_launches_in_kernel_mode']} replays={row['replays']} "
                                        f"mismatches={row['mismatching_replays']} counters_zero={row['counters_zero']} "
                                        f"nan={row['output_nan']} diff_vs_kernel={row['max_diff_vs_kernel_mode']:.3g}")
            print(f"{status:5s} {model:13s} {case.op:17s} P={case.P} {what}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    return failed


if __name__ == "__main__":
    sys.exit(main())
