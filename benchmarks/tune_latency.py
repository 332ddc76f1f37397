"""Plan latency through ``cqil_kernels.tuning`` on a random-weight model of a real shape (latency only).

``python -m cqil_kernels tune`` needs a model with real weights (it measures quality too); for a
shape whose weights are not here (Llama-7B) this times the candidate plans alone - no groups and
the paper's S/E/P plans (``--parallel``), plus ``--plans`` files - with the same
``tune.measure_latency`` (DecodeEngine; CUDA graph on a GPU, eager on the CPU; a warm-up repeat,
then ``--repeats``: median and spread). Random weights do not change the time of a step.

    python benchmarks/tune_latency.py --shape llama-7b --device cuda --parallel 2 4 --out llama7b.json
    python benchmarks/tune_latency.py --shape tiny-llama --device cpu       # CI-sized smoke run
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # decode_models


def main(argv=None) -> int:
    from decode_models import SHAPES, TINY_SHAPES, build_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="smollm2-135m", choices=sorted({**SHAPES, **TINY_SHAPES}))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--parallel", type=int, nargs="+", default=[2, 4])
    p.add_argument("--plans", nargs="*", default=[], help="plan JSON files to time as well")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--context-lengths", type=int, nargs="+", default=[256])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backend", default="auto")
    p.add_argument("--launch-config", default=None, help="launch-config JSON the engine runs under")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    from cqil_kernels import CQILPlan
    from cqil_kernels.loading import parse_dtype
    from cqil_kernels.report import environment, format_table, write_json
    from cqil_kernels.tuning import Candidate, LatencySettings, device_label, measure_latency, paper_plan

    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_model({**SHAPES, **TINY_SHAPES}[args.shape], device, dtype)
    L = model.config.num_hidden_layers
    cands = [Candidate("no groups", CQILPlan.sequential(), "baseline")]
    cands += [c for c in (paper_plan(L, q) for q in args.parallel) if c is not None]
    cands += [Candidate(f"file {os.path.basename(f)}", CQILPlan.from_json(f), f"file {f}") for f in args.plans]
    settings = LatencySettings(tuple(args.batch_sizes), tuple(args.context_lengths), args.prompt_len,
                               args.decode_steps, args.repeats, backend=args.backend,
                               launch_config=args.launch_config).check()
    rows = []
    for c in cands:
        c.plan.validate_for(L)
        lat = measure_latency(model, c.plan, settings)
        rows.append({"name": c.name, "plan": c.plan.to_dict(), "steps": c.plan.num_sequential_steps(L), "latency": lat})
        print(f"{c.name}: " + ", ".join(f"{k} {v['median_ms']:.3f} ms" for k, v in lat["decode"].items()), flush=True)
    label = device_label(device, rows[0]["latency"]["cuda_graph"], rows[0]["latency"]["backend"])
    dkeys = list(rows[0]["latency"]["decode"])
    print(f"latency MEASURED on {label}; {args.shape} random weights, {dtype}")
    print(format_table(["plan", "steps"] + [f"decode ms {k}" for k in dkeys] + [f"prefill ms {k}" for k in rows[0]["latency"]["prefill"]],
                       [[r["name"], r["steps"]] + [r["latency"]["decode"][k]["median_ms"] for k in dkeys]
                        + [v["median_ms"] for v in r["latency"]["prefill"].values()] for r in rows]))
    if args.out:
        write_json({"benchmark": "tune_latency", "shape": args.shape, "dtype": str(dtype), "latency_measured_on": label,
                    "settings": vars(args), "rows": rows, "environment": environment(str(device))}, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
