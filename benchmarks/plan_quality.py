"""Quality of CQIL plans on held-out text, plain and with the training-free correction (a
benchmark, not a test).

Searches a plan on one text (unless ``--no-search``), adds fixed plans (``--reference`` contiguous
windows, ``--plan`` explicit groups), and measures perplexity change, KL(base || converted) and
top-1 agreement of each on one or more held-out texts, plain and after ``calibrate`` (fitted on
``--calibrate-windows`` windows of the calibration text, which no held-out text shares). Each
evaluation is verified: the sequential model measured against its own precomputed log-probs must
give KL 0 and agreement 1.

    python benchmarks/plan_quality.py --out reports/plan_quality.json
    python benchmarks/plan_quality.py --calib-text ../shared/data/prideprejudice.txt \\
        --eval-text ../shared/data/sensesensibility.txt --eval-text ../shared/data/northangerabbey.txt \\
        --no-search --plan 14-15,17-18,22-23,26-27 --reference 20:28 --reference 14:28
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _parse_groups(text: str) -> list[list[int]]:
    """``"14-15,17-18"`` -> [[14, 15], [17, 18]]."""
    groups = []
    for part in text.split(","):
        a, _, b = part.strip().partition("-")
        groups.append(list(range(int(a), int(b or a) + 1)))
    return groups


def _arguments(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: embedded SmolLM2-135M")
    ap.add_argument("--calib-text", default=None, help="default: built-in text, calibration half")
    ap.add_argument("--eval-text", action="append", default=None,
                    help="held-out text (repeatable; default: built-in text, evaluation half)")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--bypass", type=int, default=0, help="bypass of the plain plans")
    ap.add_argument("--rank-metric", choices=["kl", "ppl"], default="kl")
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--swap-rounds", type=int, default=1)
    ap.add_argument("--contiguous-top", type=int, default=6, help="contiguous windows measured on calib (-1: all)")
    ap.add_argument("--corrected", action="store_true", help="search ranks by the cost after correction")
    ap.add_argument("--no-search", action="store_true", help="only the --reference and --plan plans")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-windows", type=int, default=4, help="search windows")
    ap.add_argument("--calibrate-windows", type=int, default=16, help="windows for calibrate (0: plain rows only)")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--reference", action="append", default=None,
                    help="extra contiguous plan START:END to evaluate (default 20:28); repeatable")
    ap.add_argument("--plan", action="append", default=[], help="explicit groups, e.g. 14-15,17-18; repeatable")
    ap.add_argument("--map", default="full")
    ap.add_argument("--target", default="normalized")
    ap.add_argument("--fold", default="both")
    ap.add_argument("--refit", type=int, default=0)
    ap.add_argument("--analysis", default=None, help="reuse an analysis JSON of the same calibration windows")
    ap.add_argument("--out", default="reports/plan_quality.json")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def _plans(args, model, tok, n, progress):
    """The named plans to measure, and the search result (None with --no-search)."""
    from cqil_kernels.plan import CQILPlan
    from cqil_kernels.search import search
    from cqil_kernels.texts import load_windows

    named, res = {}, None
    if not args.no_search:
        calib = load_windows(tok, args.calib_text, split="calib", seq_len=args.seq_len, max_windows=args.calib_windows)
        analysis = None
        if args.analysis:
            from cqil_kernels.analysis import LayerAnalysis

            analysis = LayerAnalysis.from_json(args.analysis)
            if analysis.text.get("source") != calib.source or analysis.text.get("scored_tokens") != calib.num_scored:
                raise SystemExit(f"{args.analysis} was measured on other calibration windows ({analysis.text})")
        res = search(model, calib, args.parallel, args.groups, bypass=args.bypass, rank_metric=args.rank_metric,
                     analysis=analysis, beam=args.beam, swap_rounds=args.swap_rounds, progress=progress,
                     contiguous_top=None if args.contiguous_top < 0 else args.contiguous_top,
                     batch_size=args.batch_size, corrected=args.corrected)
        named["search"] = res.plan
        if res.best_contiguous:
            named["best contiguous (calib)"] = CQILPlan(res.best_contiguous["groups"], bypass=args.bypass)
    for ref in args.reference if args.reference is not None else ([] if args.plan else ["20:28"]):
        s, e = (int(v) for v in ref.split(":"))
        named[f"contiguous {s}..{e - 1}"] = CQILPlan.contiguous(s, e, args.parallel, bypass=args.bypass)
    for text in args.plan:
        plan = CQILPlan(_parse_groups(text), bypass=args.bypass)
        plan.validate_for(n)
        named[f"plan {text}"] = plan
    return named, res


def main(argv=None) -> int:
    import cqil_kernels as ck
    from cqil_kernels.evaluate import base_log_probs, evaluate, plan_applied
    from cqil_kernels.loading import load_model
    from cqil_kernels.report import environment, format_table, write_json
    from cqil_kernels.texts import load_windows

    args = _arguments(argv)
    progress = not args.no_progress
    eval_paths = args.eval_text or [None]
    if args.calib_text is not None and args.calib_text in eval_paths:
        print("warning: calibration text == evaluation text", file=sys.stderr)

    t_start = time.perf_counter()
    model, tok = load_model(args.model)
    n = model.config.num_hidden_layers
    named, res = _plans(args, model, tok, n, progress)
    t_search = time.perf_counter() - t_start

    evals = [load_windows(tok, p, split="eval", seq_len=args.seq_len, max_windows=args.eval_windows)
             for p in eval_paths]
    bases = [base_log_probs(model, ev, batch_size=args.batch_size, progress=progress) for ev in evals]
    base_ppl = [evaluate(model, ev, base_model=b, batch_size=args.batch_size, progress=progress)
                for ev, b in zip(evals, bases)]
    # Verification: the sequential model against its own precomputed log-probs.
    verified = all(r.kl < 1e-6 and r.top1_agreement > 0.9999 for r in base_ppl)
    fitw = None
    if args.calibrate_windows > 0:
        fitw = load_windows(tok, args.calib_text, split="calib", seq_len=args.seq_len,
                            max_windows=args.calibrate_windows)

    def measure(label):
        return [evaluate(model, ev, base_model=b, batch_size=args.batch_size, progress=progress).to_dict()
                for ev, b in zip(evals, bases)]

    entries = []
    for name, plan in named.items():
        with plan_applied(model, plan, "auto"):
            entries.append({"name": name, "variant": "plain", "plan": plan.to_dict(), "fit_seconds": None,
                            "evaluation": measure(name)})
        if fitw is None:
            continue
        cal = ck.calibrate(model, plan, fitw, keep_original=True, batch_size=args.batch_size, progress=progress,
                           map=args.map, target=args.target, fold=args.fold, refit=args.refit)
        try:
            entries.append({"name": name, "variant": "calibrated", "plan": cal.plan.to_dict(),
                            "fit_seconds": cal.seconds, "calibration": cal.to_dict(), "evaluation": measure(name)})
        finally:
            cal.restore(model)
        print(f"{name}: calibrated in {cal.seconds:.0f} s, bypass {list(cal.plan.bypasses)}", file=sys.stderr,
              flush=True)

    header = ["plan", "variant", "groups", "d", "steps", "fit s"]
    for ev in evals:
        short = ev.source.rsplit("/", 1)[-1]
        header += [f"{short} ppl %", "KL", "top-1"]
    rows = []
    for e in entries:
        plan = ck.CQILPlan.from_dict(e["plan"])
        row = [e["name"], e["variant"], " ".join(f"{g[0]}-{g[-1]}" for g in plan.groups),
               ",".join(map(str, plan.bypasses)), plan.num_sequential_steps(n), e["fit_seconds"]]
        for r in e["evaluation"]:
            row += [r["ppl_increase"] * 100, r["kl"], r["top1_agreement"]]
        rows.append(row)
    table = format_table(header, rows)
    for ev, b in zip(evals, base_ppl):
        print(f"base perplexity on {ev.source}: {b.perplexity:.3f} ({ev.num_scored} tokens)")
    print(table)
    write_json({
        "model": args.model or "smollm2",
        "calibration_text": fitw.to_dict() if fitw is not None else None,
        "evaluation_texts": [ev.to_dict() for ev in evals],
        "base_perplexity_eval": [b.perplexity for b in base_ppl],
        "settings": vars(args),
        "plans": entries,
        "search": res.to_dict(include_analysis=True) if res is not None else None,
        "table": table,
        "seconds": {"search": t_search, "total": time.perf_counter() - t_start},
        "verification": {"sequential_kl": [b.kl for b in base_ppl], "ok": verified},
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
    }, args.out)
    print(f"wrote {args.out}")
    if not verified:
        print("verification FAILED: the sequential model does not reproduce its own log-probs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
