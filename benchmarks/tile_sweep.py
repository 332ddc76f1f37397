"""Tile and split-K sweep of the weight-streaming decode GEMMs at M = 1 (a GPU check).

The decode tiles (``launch_config.heuristic_config("gpu")``: BM 16, BN 64, BK 128, 4 warps, 4
stages; gate_up_silu BK 64) and the split-K policy (about 2 programs per SM) are untuned
heuristics. For each
GEMM (gate_up_silu first: about 45% of a Llama layer's weight bytes; then down_sum, qkv_gemm,
batched_gemm) at Llama-7B P = 2, then SmolLM2-135M P = 2, this times the defaults, then one change
at a time (num_stages 3/5, BK 64/256, BN 32/128, 8 warps), then forced split counts. A config is
swept across all four ops before the next one, so a run cut by its deadline leaves comparable
rows. Every config is verified (the tests' error budget) and timed as ``bench_kernels.py`` times
(copies of the inputs >= 3x L2, CUDA-graph replay); one JSONL row per config.

    python benchmarks/tile_sweep.py --jsonl /tmp/sweep.jsonl --deadline-s 120
    python benchmarks/tile_sweep.py --dry-run          # tiny shapes through the interpreter

Tiles are overridden by a launch configuration whose tile table has the op's decode row changed
(on top of the current one, so the interpreter set-up is kept); splits go through the op's
``*_triton(..., split_k=k)``. The per-shape tuner that writes a device's launch-config file is
``tune_kernels.py`` (``tune --kernels``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

OPS = ("gate_up_silu", "down_sum", "qkv_gemm", "batched_gemm")
TILE_CHANGES = ({}, {"num_stages": 3}, {"num_stages": 5}, {"BK": 64}, {"BK": 256}, {"BN": 32}, {"BN": 128},
                {"num_warps": 8})
SPLITS = (1, 2, 4, 8, 16, 32)


def configs(dry: bool):
    """(tile change, forced split or None) in sweep order."""
    if dry:
        return [({}, None), ({"BK": 64}, None), ({}, 2)]
    return [(t, None) for t in TILE_CHANGES] + [({}, k) for k in SPLITS]


@contextlib.contextmanager
def tiles(op: str, change: dict, device):
    """Within the block, the op's decode tile is the current one with ``change`` applied."""
    import dataclasses

    from cqil_kernels.launch_config import TileRule, launch_config_for, use_launch_config

    cfg = launch_config_for(device)
    tile = dataclasses.replace(cfg.gemm_tile(op, 1, 0, 0, 0), **change)  # (0, 0, 0): the class row
    with use_launch_config(cfg.with_rules([TileRule(op, "decode", tile)], source=f"{cfg.source} + sweep {change}")):
        yield


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jsonl", default=None)
    ap.add_argument("--step", default="tile-sweep")
    ap.add_argument("--deadline-s", type=float, default=300.0, help="stop starting configs after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU through the interpreter")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before cqil_kernels.ops decorates its kernels
    for p in (ROOT, HERE):
        if p not in sys.path:
            sys.path.insert(0, p)
    import torch

    import bench_kernels as bk
    from step_log import StepLog

    t0 = time.perf_counter()
    log = StepLog(args.jsonl, args.step)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("tile_sweep.py: no CUDA device (use --dry-run)", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    ceiling = bk.measure_ceilings(device)
    read = ceiling["read"]["gbps"]
    log.emit("ok", dict(kind="ceilings", read_gbps=read, copy_gbps=ceiling["copy"]["gbps"], l2_bytes=ceiling["l2_bytes"]))
    timer = bk.Timer(device, quick=True)
    models = {"tiny": bk.SMOKE_MODELS["tiny"]} if args.dry_run else {"Llama-7B": bk.MODELS["Llama-7B"],
                                                                     "SmolLM2-135M": bk.MODELS["SmolLM2-135M"]}
    ops = OPS[:2] if args.dry_run else OPS
    stopped = False
    for model, cfg in models.items():
        cases = {c.op: c for c in bk.cases(model, cfg, [1], [2], dtype, device, ops=ops)}
        copies = {}
        for op, case in cases.items():
            first = case.make()
            n = bk.copies_needed(bk._tensor_bytes(first), ceiling["l2_bytes"])
            copies[op] = [first] + [case.make() for _ in range(n - 1)]
        for change, split in configs(args.dry_run):
            for op in ops:
                if time.perf_counter() - t0 > args.deadline_s:
                    stopped = True
                    break
                case = cases[op]
                row = dict(model=model, op=op, M=1, P=2, tiles=change or "default", split_k=split or "heuristic",
                           bytes=case.nbytes)
                try:
                    def fn(d, case=case, split=split, change=change):
                        with tiles(case.op, change, torch.device(device)):
                            return case.triton(d, split)

                    ref_fn, ref_args = case.reference(copies[op][0])
                    ok, err, budget = bk.verify(op, fn(copies[op][0]), ref_fn, ref_args)
                    t = timer(fn, copies[op])
                    gbps = case.nbytes / (t["us"] * 1e-6) / 1e9
                    row.update(status="ok" if ok else "verify_failed", max_err_vs_ref=err, budget=budget, us=round(t["us"], 3),
                               GBps=round(gbps, 1), frac_of_read=round(gbps / read, 3), copies=len(copies[op]),
                               method=t["method"])
                except Exception as e:  # noqa: BLE001 - e.g. a tile that does not fit: a row
                    row.update(status="error", error=f"{type(e).__name__}: {e}"[:400])
                log.emit("ok" if row["status"] == "ok" else "fail", row)
                what = row.get("error") or f"{row['us']:9.2f} us {row['GBps']:7.1f} GB/s ({row['frac_of_read']:.0%} of read) {row['status']}"
                print(f"{model:13s} {op:13s} tiles={str(row['tiles']):18s} split={str(row['split_k']):9s} {what}", flush=True)
            if stopped:
                break
        del copies, cases
        if device == "cuda":
            torch.cuda.empty_cache()
        if stopped:
            break
    log.emit("done", dict(kind="summary", stopped_at_deadline=stopped, elapsed_s=time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
