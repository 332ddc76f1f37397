"""MODELED ms/token of CQIL on W GPUs (not measured on several GPUs): the paper's plans, with and without overlap.

The model (``cqil_kernels.distributed.latency_model``, design.md section 4):

    T = t_embed_head + U * c_1 + sum_groups (c_{P/W} + t_AR)

with ``c_k`` the one-device time of a k-layer segment and ``t_AR`` one all-reduce of a group's
output. Inputs, each labelled with its source in the JSON:

- ``c_k``: derived from the H100 anchors of design.md section 3 (torch + cuBLAS, one CUDA graph,
  bf16, batch 1, ctx 256: Llama-7B 7.56 / 6.81 / 6.48 ms for no groups / P2 S12-E30 / P4 S14-E30;
  Llama-13B 12.6 / 11.5 / 10.9); or, with ``--measure``, timed here by running
  ``cqil_kernels.DecodeEngine`` (eager) on random-weight models of 2 and 4 layers;
- ``t_AR``: the published H100 NVLink small-message figures of design.md section 4 (NCCL through
  torch.distributed 19-23 us, symmetric-memory one-shot 3.7-7.8 us, both 8 GPUs), plus a bus
  bandwidth for large (prefill) messages; with ``--allreduce-json`` the gloo table measured here
  by ``benchmarks/allreduce_latency.py``.

    python benchmarks/multi_gpu_model.py --out benchmarks/results/multi_gpu_model.json
    python benchmarks/multi_gpu_model.py --measure --shape tiny-llama \
        --allreduce-json benchmarks/results/allreduce_gloo_cpu.json --out ...

Prints a table and compares with the paper (-26.2% LLaMA-7B P2 on 2 GPUs, -37.4% P4 on 4; A100,
batch 1, one forward without KV cache - a different setting, so only indicative) and with this
project's targets (7B P2 on 2 GPUs >= 1.40x the same engine on 1 GPU, P4 on 4 >= 1.7x).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling benchmark modules

from cqil_kernels import CQILPlan  # noqa: E402
from cqil_kernels.distributed.latency_model import (  # noqa: E402
    FORMULA,
    OVERLAP_SCHEDULE,
    AllReduceCost,
    SegmentCosts,
    modeled_step,
)

# ---------------------------------------------------------------------------------------------- inputs

DESIGN_SECTION_3 = "design.md section 3 table (H100 80GB HBM3, bf16, batch 1, ctx 256, torch+cuBLAS, 1 CUDA graph)"

ANCHORS = {
    "llama-7b": {
        "layers": 32, "hidden": 4096, "intermediate": 11008, "vocab": 32000,
        "rows_ms": {1: 7.56, 2: 6.81, 4: 6.48},
        "plans": {2: (12, 30), 4: (14, 30)},
        "c1_ms": 0.233,  # design.md section 4 ("c_1 ~ 0.233 ms")
        "notes": "c_1 = 0.233 ms from design.md section 4; t_embed_head = T_seq - 32 c_1; c_2, c_4 solved from the P2 "
                 "(S12-E30) and P4 (S14-E30) rows",
    },
    "llama-13b": {
        "layers": 40, "hidden": 5120, "intermediate": 13824, "vocab": 32000,
        "rows_ms": {1: 12.6, 2: 11.5, 4: 10.9},
        "plans": {2: (14, 38), 4: (14, 38)},
        "notes": "ASSUMPTIONS: t_embed_head = Llama-7B's scaled by the LM-head bytes (5120/4096); c_1 = (T_seq - "
                 "t_embed_head) / 40; the P4 row's plan is not given in design.md: S14-E38 assumed (as for P2)",
    },
}

PAPER_LATENCY_CHANGE = {("llama-7b", 2): -26.2, ("llama-7b", 4): -37.4}  # %, arXiv 2404.06709 (A100, no KV cache)
TARGET_SPEEDUP = {("llama-7b", 2): 1.40, ("llama-7b", 4): 1.7}

# Large-message bus bandwidth for prefill-sized reductions: nccl-tests all_reduce_perf busbw at large
# sizes on 8x H100 SXM5 NVLink, 460-480 GB/s (low end used); applied to 2 and 4 GPUs (an assumption).
BUSBW_SOURCE = "https://docs.alayanew.com/en/docs/tech-blog/2026-05-06-nccl-tests (8x H100 SXM5, nccl-tests busbw 460-480 GB/s)"
H100_ALL_REDUCE = {
    "symm one-shot 3.7us": AllReduceCost(0.0037, 460.0, "design.md section 4: one-shot symmetric memory 3.7-7.8 us (H100 NVLink, 8-32 KB, 8 GPUs)"),
    "symm one-shot 7.8us": AllReduceCost(0.0078, 460.0, "design.md section 4: one-shot symmetric memory 3.7-7.8 us"),
    "NCCL 19us": AllReduceCost(0.019, 460.0, "design.md section 4: NCCL via torch.distributed 19-23 us (8 GPUs)"),
    "NCCL 23us": AllReduceCost(0.023, 460.0, "design.md section 4: NCCL via torch.distributed 19-23 us"),
}
H100_BF16_FLOPS = 790e12  # design.md section 3: measured bf16 GEMM rate on the H100


def plan_groups(layers: int, parallel: int, rng: tuple[int, int]) -> tuple[tuple[int, ...], ...]:
    return CQILPlan.contiguous(rng[0], rng[1], parallel).groups


def anchor_costs(name: str) -> SegmentCosts:
    """c_1, c_2, c_4 and t_embed_head (ms) solved from the design.md rows of model ``name``."""
    a = ANCHORS[name]
    L, rows = a["layers"], a["rows_ms"]
    if "c1_ms" in a:
        c1 = a["c1_ms"]
        t_eh = rows[1] - L * c1
    else:
        ref = ANCHORS["llama-7b"]
        t_eh_7b = ref["rows_ms"][1] - ref["layers"] * ref["c1_ms"]
        t_eh = t_eh_7b * (a["vocab"] * a["hidden"]) / (ref["vocab"] * ref["hidden"])
        c1 = (rows[1] - t_eh) / L
    c = {1: c1}
    for p in (2, 4):
        groups = plan_groups(L, p, a["plans"][p])
        u = L - p * len(groups)
        c[p] = (rows[p] - t_eh - u * c1) / len(groups)
    return SegmentCosts(c=c, t_embed_head=t_eh, source=f"derived from {DESIGN_SECTION_3}; {a['notes']}")


def layer_params(a: dict) -> int:
    h, i = a["hidden"], a["intermediate"]
    return 4 * h * h + 3 * h * i  # MHA q, k, v, o + gate, up, down


def prefill_costs(decode: SegmentCosts, a: dict, tokens: int, batch: int) -> SegmentCosts:
    """Roofline for a prefill of ``batch`` x ``tokens``: c_k = max(c_k(decode), k * FLOPs / 790 TFLOP/s).

    FLOPs per layer = batch * (2 T params + 2 T^2 H) (causal attention); the head runs on the last
    token only. Micro-batches split the batch (whole sequences), so a half has exactly half the FLOPs.
    """
    flops = batch * (2 * tokens * layer_params(a) + 2 * tokens * tokens * a["hidden"])
    per_layer_ms = flops / H100_BF16_FLOPS * 1e3
    c = {k: max(v, k * per_layer_ms) for k, v in decode.c.items()}
    return SegmentCosts(c=c, t_embed_head=decode.t_embed_head, source=(
        f"roofline from the decode costs for {batch} x {tokens} tokens: max(c_k, k * FLOPs / 790 TFLOP/s)"))


# ---------------------------------------------------------------------------------------------- rows

def model_rows(name: str, costs: SegmentCosts, layers: int, plans: dict, hidden: int, all_reduce: dict,
               bytes_per_elem: int = 2, phase_costs=None) -> list[dict]:
    """One row per (W = P, all-reduce figure): one-device and W-device ms, speedups, overlap forms.

    ``phase_costs``: optional ``{label: (tokens, costs of the full batch, costs of one half)}`` for
    the two-micro-batch comparison at larger token counts (prefill; ``tokens``: the full batch's).
    """
    rows = []
    seq_1 = modeled_step(layers, [], 1, costs, 0.0)["ms"]
    for p, groups in plans.items():
        w = p
        plan_1 = modeled_step(layers, groups, 1, costs, 0.0)["ms"]
        for label, cost in all_reduce.items():
            t1 = cost.time_ms(1 * hidden * bytes_per_elem, w)
            t2 = cost.time_ms(2 * hidden * bytes_per_elem, w)
            plain = modeled_step(layers, groups, w, costs, t1)
            # batch 2 decode: plain (one reduction of [2, H]) vs two micro-batches of 1 (c flat in M at decode)
            batch2_plain = modeled_step(layers, groups, w, costs, t2)["ms"]
            batch2_overlap = modeled_step(layers, groups, w, costs, t2, overlap=True, half_costs=costs,
                                          t_ar_half_ms=t1)["ms"]
            row = {
                "model": name, "plan": f"S{groups[0][0]}-E{groups[-1][-1] + 1} P{p}", "world_size": w,
                "all_reduce": label, "t_ar_us": t1 * 1e3,
                "ms_1dev_sequential": seq_1, "ms_1dev_plan": plan_1, "ms_w_devices": plain["ms"],
                "speedup_vs_1dev_sequential": seq_1 / plain["ms"], "speedup_vs_1dev_plan": plan_1 / plain["ms"],
                "latency_change_pct": (plain["ms"] / seq_1 - 1) * 100,
                "paper_latency_change_pct": PAPER_LATENCY_CHANGE.get((name, p)),
                "terms": plain["terms"], "split_groups": plain["split_groups"],
                "batch2_ms_plain": batch2_plain, "batch2_ms_two_microbatches": batch2_overlap,
            }
            for ph, (tokens, full, half) in (phase_costs or {}).items():
                tf = cost.time_ms(tokens * hidden * bytes_per_elem, w)
                th = cost.time_ms(tokens // 2 * hidden * bytes_per_elem, w)
                row[f"{ph}_ms_plain"] = modeled_step(layers, groups, w, full, tf)["ms"]
                row[f"{ph}_ms_two_microbatches"] = modeled_step(layers, groups, w, full, tf, overlap=True,
                                                                half_costs=half, t_ar_half_ms=th)["ms"]
            target = TARGET_SPEEDUP.get((name, p))
            if target is not None:
                row["target_speedup"] = target
                row["target_met_vs_1dev_sequential"] = row["speedup_vs_1dev_sequential"] >= target
                row["target_met_vs_1dev_plan"] = row["speedup_vs_1dev_plan"] >= target
                row["groups_needed_for_target_vs_1dev_sequential"] = groups_needed(layers, p, costs, t1, seq_1 / target)
            rows.append(row)
    return rows


def groups_needed(layers: int, p: int, costs: SegmentCosts, t_ar_ms: float, goal_ms: float) -> int | None:
    """Fewest groups of ``p`` layers on ``p`` ranks that bring the modeled step to ``goal_ms`` (None:
    not even every layer grouped). Without overlap only the number of groups matters, not where."""
    for n in range(1, layers // p + 1):
        groups = [list(range(i * p, (i + 1) * p)) for i in range(n)]
        if modeled_step(layers, groups, p, costs, t_ar_ms)["ms"] <= goal_ms:
            return n
    return None


def anchored_rows() -> tuple[list[dict], dict]:
    rows, inputs = [], {}
    for name, a in ANCHORS.items():
        costs = anchor_costs(name)
        plans = {p: plan_groups(a["layers"], p, a["plans"][p]) for p in (2, 4)}
        phases = {}
        for tokens in (512, 2048):  # batch 2 x tokens, split into two micro-batches of one sequence
            phases[f"prefill2x{tokens}"] = (2 * tokens, prefill_costs(costs, a, tokens, 2),
                                            prefill_costs(costs, a, tokens, 1))
        rows += model_rows(name, costs, a["layers"], plans, a["hidden"], H100_ALL_REDUCE, phase_costs=phases)
        inputs[name] = {"segment_costs": costs.to_dict(),
                        "plans": {str(p): [list(g) for g in gs] for p, gs in plans.items()},
                        "prefill_costs": {k: v[1].to_dict() for k, v in phases.items()}}
    return rows, inputs


# ---------------------------------------------------------------------------------------------- --measure

def measure_segment_costs(shape: str, device: str, steps: int, threads: int, backend: str) -> SegmentCosts:
    """c_1, c_2, c_4 and t_embed_head of ``shape`` timed with DecodeEngine on ``device``.

    Models of 2 and 4 layers (random weights): T(2 seq) = t + 2 c_1, T(4 seq) = t + 4 c_1,
    T(4: [0,1],[2,3]) = t + 2 c_2, T(4: [0..3]) = t + c_4, each the fastest of ``steps`` timed decode
    steps (on a machine shared with other work the minimum estimates the uncontended time; the
    medians are recorded too).
    """
    import statistics

    import torch

    import cqil_kernels
    from decode_models import SHAPES, TINY_SHAPES, build_model
    from e2e_decode import Clock, make_prompt

    kwargs = dict({**SHAPES, **TINY_SHAPES}[shape])
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    clock = Clock(dev)
    torch.set_num_threads(threads)
    medians = {}

    @torch.inference_mode()
    def step_ms(label: str, layers: int, groups) -> float:
        model = build_model(dict(kwargs, num_hidden_layers=layers), dev, dtype)
        if groups:
            cqil_kernels.convert(model, CQILPlan(groups), backend=backend)
        engine = cqil_kernels.DecodeEngine(model, max_batch_size=1, max_length=16 + steps + 8, backend=backend)
        ids, mask = make_prompt(1, 16, kwargs["vocab_size"], dev)
        tok = engine.prefill(ids, mask).argmax(-1)
        for _ in range(3):  # warm-up (CUDA: graph capture on the first step)
            tok = engine.step(tok).argmax(-1)
        engine.prefill(ids, mask)
        times = []
        for _ in range(steps):
            t0 = clock.now()
            tok = engine.step(tok).argmax(-1)
            times.append((clock.now() - t0) * 1e3)
        medians[label] = statistics.median(times)
        return min(times)

    seq2, seq4 = step_ms("T2", 2, []), step_ms("T4", 4, [])
    pairs, quad = step_ms("T4pairs", 4, [[0, 1], [2, 3]]), step_ms("T4group", 4, [[0, 1, 2, 3]])
    c1 = (seq4 - seq2) / 2
    t = seq2 - 2 * c1
    costs = {1: c1, 2: (pairs - t) / 2, 4: quad - t}
    return SegmentCosts(c=costs, t_embed_head=t, source=(
        f"measured here: DecodeEngine eager ({backend}) on {device} {dtype}, {threads} torch thread(s), random-weight "
        f"{shape} shape with 2 and 4 layers, batch 1, prompt 16, fastest of {steps} steps: T2={seq2:.3f} T4={seq4:.3f} "
        f"T4pairs={pairs:.3f} T4group={quad:.3f} ms (medians {', '.join(f'{k}={v:.3f}' for k, v in medians.items())})"))


def gloo_all_reduce_table(path: str, hidden: int) -> dict:
    """The measured process-group all-reduce (fp32 decode, batch 1) closest in size to ``hidden``."""
    import json

    data = json.loads(open(path, encoding="utf-8").read())
    rows = [r for r in data["rows"] if r["engine"] == "process_group" and r["dtype"] == "fp32"
            and r["phase"] == "decode" and r["tokens"] == 1]
    if not rows:
        raise ValueError(f"{path} has no fp32 decode batch-1 process_group rows")
    best = min(rows, key=lambda r: abs(r["hidden"] - hidden))
    label = f"{data['backend']} measured {best['us_median']:.0f}us (H {best['hidden']})"
    return {label: AllReduceCost(best["us_median"] / 1e3, None,
                                 f"{path}: {data['world_size']} {data['backend']} processes, {data['environment']['device']}")}


# ---------------------------------------------------------------------------------------------- main

def print_rows(rows: list[dict]) -> None:
    from cqil_kernels.report import format_table

    header = ["model", "plan", "W", "all-reduce", "1 dev seq", "1 dev plan", "W devs", "x vs seq", "x vs plan",
              "change %", "paper %", "b2 plain", "b2 overlap", "target met"]
    table = []
    for r in rows:
        met = "-" if "target_speedup" not in r else (
            f">={r['target_speedup']}x: {'yes' if r['target_met_vs_1dev_sequential'] else 'no'}"
            f"/{'yes' if r['target_met_vs_1dev_plan'] else 'no'}")
        table.append([r["model"], r["plan"], r["world_size"], r["all_reduce"], round(r["ms_1dev_sequential"], 3),
                      round(r["ms_1dev_plan"], 3), round(r["ms_w_devices"], 3), round(r["speedup_vs_1dev_sequential"], 3),
                      round(r["speedup_vs_1dev_plan"], 3), round(r["latency_change_pct"], 1),
                      r["paper_latency_change_pct"] if r["paper_latency_change_pct"] is not None else "-",
                      round(r["batch2_ms_plain"], 3), round(r["batch2_ms_two_microbatches"], 3), met])
    print(format_table(header, table))
    for r in rows:
        if "target_speedup" in r:
            n = r["groups_needed_for_target_vs_1dev_sequential"]
            have = r["split_groups"] if "split_groups" in r else "?"
            print(f"{r['model']} {r['plan']} ({r['all_reduce']}): {r['speedup_vs_1dev_sequential']:.3f}x vs the 1-device "
                  f"sequential engine, target {r['target_speedup']}x {'met' if r['target_met_vs_1dev_sequential'] else 'NOT met'}"
                  f"; the model needs {n if n is not None else 'more than all'} groups of {r['world_size']} "
                  f"({r['plan']} has {have})")
    pre = [r for r in rows if "prefill2x512_ms_plain" in r]
    if pre:
        print()
        header = ["model", "plan", "all-reduce", "prefill 2x512 plain", "2x512 overlap", "prefill 2x2048 plain",
                  "2x2048 overlap"]
        print(format_table(header, [[r["model"], r["plan"], r["all_reduce"], round(r["prefill2x512_ms_plain"], 3),
                                     round(r["prefill2x512_ms_two_microbatches"], 3),
                                     round(r["prefill2x2048_ms_plain"], 3),
                                     round(r["prefill2x2048_ms_two_microbatches"], 3)] for r in pre]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--measure", action="store_true", help="also time c_k with DecodeEngine here (small shapes on CPU)")
    p.add_argument("--shape", default="tiny-llama", help="model shape for --measure (benchmarks/decode_models.py)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch", help="DecodeEngine backend for --measure")
    p.add_argument("--steps", type=int, default=60, help="timed decode steps per model for --measure")
    p.add_argument("--threads", type=int, default=1, help="torch threads for --measure")
    p.add_argument("--allreduce-json", default=None, help="allreduce_latency.py output for the --measure rows")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from cqil_kernels.report import environment, write_json

    rows, inputs = anchored_rows()
    data = {
        "benchmark": "multi_gpu_model",
        "MODELED": "every ms here is modeled from the inputs below, not measured on several GPUs",
        "formula": FORMULA,
        "overlap_schedule": OVERLAP_SCHEDULE,
        "batch2_columns": "decode batch 2: one reduction of [2, H] vs two micro-batches of 1 (c flat in the batch at decode)",
        "prefill_columns": "prefill of batch 2 x 512 / 2 x 2048 tokens, plain vs two micro-batches of one sequence "
                           "(roofline c_k from the decode anchors and 790 TFLOP/s)",
        "targets": "7B P2 on 2 GPUs >= 1.40x, P4 on 4 >= 1.7x the same engine on 1 GPU (checked against the 1-GPU "
                   "sequential engine and the 1-GPU engine running the same plan)",
        "inputs": {"anchored": inputs,
                   "all_reduce": {k: {"latency_ms": v.latency_ms, "busbw_gbps": v.busbw_gbps, "source": v.source,
                                      "busbw_source": BUSBW_SOURCE} for k, v in H100_ALL_REDUCE.items()},
                   "bf16_flops": {"value": H100_BF16_FLOPS, "source": "design.md section 3 (H100, measured)"},
                   "paper": "arXiv 2404.06709: LLaMA-7B -26.2% (P2, 2 GPUs), -37.4% (P4, 4 GPUs); A100 NVLink, batch 1, "
                            "one forward, no KV cache"},
        "rows": rows,
    }
    print("MODELED (not measured on several GPUs) - H100 anchors of design.md")
    print_rows(rows)
    if args.measure:
        from decode_models import SHAPES, TINY_SHAPES, paper_plan

        shape = {**SHAPES, **TINY_SHAPES}[args.shape]
        costs = measure_segment_costs(args.shape, args.device, args.steps, args.threads, args.backend)
        layers = shape["num_hidden_layers"]
        plans = {q: paper_plan(layers, q).groups for q in (2, 4)}
        table = gloo_all_reduce_table(args.allreduce_json, shape["hidden_size"]) if args.allreduce_json else {}
        table["zero-cost all-reduce"] = AllReduceCost(0.0, None, "the compute-only bound")
        measured = model_rows(args.shape, costs, layers, plans, shape["hidden_size"], table, bytes_per_elem=4)
        data["measured"] = {"environment": environment(args.device), "segment_costs": costs.to_dict(),
                            "plans": {str(q): [list(g) for g in gs] for q, gs in plans.items()}, "rows": measured,
                            "note": "c_k measured on this device; W ranks are assumed to have one such device each"}
        print(f"\nMODELED from segment times MEASURED here ({costs.source})")
        print_rows(measured)
    if args.out:
        data["environment"] = environment("cpu")
        print(f"wrote {write_json(data, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
