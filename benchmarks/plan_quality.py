"""Quality of searched CQIL plans on held-out text (a benchmark, not a test).

Calibrates (analyze + search) on one text and measures perplexity, KL(base || converted) and
top-1 agreement on another, for: the searched plan, the best contiguous plan on the calibration
text, and fixed reference plans (by default the contiguous window 20..27 of SmolLM2's 30 layers).
Each evaluation is verified: the base model's perplexity is recomputed in the same pass, and a
sequential "plan" must give KL 0 and agreement 1.

    python benchmarks/plan_quality.py --out reports/plan_quality.json
    python benchmarks/plan_quality.py --calib-text ../shared/data/prideprejudice.txt \\
        --eval-text ../shared/data/sensesensibility.txt --groups 4
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv=None) -> int:
    from cqil_kernels.evaluate import compare_plans
    from cqil_kernels.loading import load_model
    from cqil_kernels.plan import CQILPlan
    from cqil_kernels.report import environment, format_table, write_json
    from cqil_kernels.search import search
    from cqil_kernels.texts import load_windows

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: embedded SmolLM2-135M")
    ap.add_argument("--calib-text", default=None, help="default: built-in text, calibration half")
    ap.add_argument("--eval-text", default=None, help="default: built-in text, evaluation half")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--bypass", type=int, default=0)
    ap.add_argument("--rank-metric", choices=["kl", "ppl"], default="kl")
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--swap-rounds", type=int, default=1)
    ap.add_argument("--contiguous-top", type=int, default=6, help="contiguous windows measured on calib (-1: all)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--reference", action="append", default=None,
                    help="extra contiguous plan START:END to evaluate (default 20:28); repeatable")
    ap.add_argument("--analysis", default=None, help="reuse an analysis JSON of the same calibration windows")
    ap.add_argument("--out", default="reports/plan_quality.json")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    progress = not args.no_progress

    t_start = time.perf_counter()
    model, tok = load_model(args.model)
    n = model.config.num_hidden_layers
    calib = load_windows(tok, args.calib_text, split="calib", seq_len=args.seq_len, max_windows=args.calib_windows)
    evalw = load_windows(tok, args.eval_text, split="eval", seq_len=args.seq_len, max_windows=args.eval_windows)
    if args.calib_text is not None and args.calib_text == args.eval_text:
        print("warning: calibration text == evaluation text", file=sys.stderr)

    analysis = None
    if args.analysis:
        from cqil_kernels.analysis import LayerAnalysis

        analysis = LayerAnalysis.from_json(args.analysis)
        if analysis.text.get("source") != calib.source or analysis.text.get("scored_tokens") != calib.num_scored:
            raise SystemExit(f"{args.analysis} was measured on other calibration windows ({analysis.text})")
    res = search(model, calib, args.parallel, args.groups, bypass=args.bypass, rank_metric=args.rank_metric,
                 analysis=analysis,
                 beam=args.beam, swap_rounds=args.swap_rounds, progress=progress,
                 contiguous_top=None if args.contiguous_top < 0 else args.contiguous_top,
                 batch_size=args.batch_size)
    t_search = time.perf_counter() - t_start

    named = {"search": res.plan}
    if res.best_contiguous:
        named["best contiguous (calib)"] = CQILPlan(res.best_contiguous["groups"], bypass=args.bypass)
    for ref in args.reference or ["20:28"]:
        s, e = (int(v) for v in ref.split(":"))
        named[f"contiguous {s}..{e - 1}"] = CQILPlan.contiguous(s, e, args.parallel, bypass=args.bypass)
    named["sequential (check)"] = None
    base, results = compare_plans(model, evalw, list(named.values()), batch_size=args.batch_size,
                                  progress=progress, desc="held-out evaluation")
    check = results[-1]
    # Verification: the sequential plan must reproduce the base (a second forward of the same
    # batch; argmax near-ties may flip a token in 10^4, so not bit-exact).
    verified = check.kl < 1e-5 and check.top1_agreement > 0.999

    rows, entries = [], []
    for (name, plan), r in zip(named.items(), results):
        calib_entry = None
        if plan is not None:
            for s in res.steps + res.contiguous:
                if s.get("groups") == [list(g) for g in plan.groups] and "kl" in s:
                    calib_entry = {"ppl_increase": s["ppl_increase"], "kl": s["kl"]}
        steps = plan.num_sequential_steps(n) if plan is not None else n
        groups = " ".join(f"{g[0]}-{g[-1]}" for g in plan.groups) if plan is not None else "-"
        rows.append([name, groups, steps, calib_entry["ppl_increase"] * 100 if calib_entry else None,
                     r.perplexity, r.ppl_increase * 100, r.kl, r.top1_agreement])
        entries.append({"name": name, "plan": plan.to_dict() if plan else None, "calibration": calib_entry,
                        "evaluation": r.to_dict()})
    table = format_table(["plan", "groups", "steps", "calib ppl %", "eval ppl", "eval ppl %", "eval KL", "top-1"],
                         rows)
    print(f"base perplexity on {evalw.source}: {base.perplexity:.3f} ({evalw.num_scored} tokens)")
    print(table)
    write_json({
        "model": args.model or "smollm2",
        "calibration_text": calib.to_dict(),
        "evaluation_text": evalw.to_dict(),
        "base_perplexity_eval": base.perplexity,
        "base_perplexity_calib": res.base_perplexity,
        "settings": vars(args),
        "plans": entries,
        "search": res.to_dict(include_analysis=True),
        "table": table,
        "seconds": {"search": t_search, "total": time.perf_counter() - t_start},
        "verification": {"sequential_kl": check.kl, "sequential_top1": check.top1_agreement, "ok": verified},
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
    }, args.out)
    print(f"wrote {args.out}")
    if not verified:
        print(f"verification FAILED: sequential plan KL {check.kl:.3g}, top-1 {check.top1_agreement:.6f}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
