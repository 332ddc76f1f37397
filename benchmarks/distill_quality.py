"""Held-out quality of a CQIL plan before and after LoRA + KL distillation (a benchmark).

Plan: ``--plan`` (JSON file or inline JSON) or ``search`` on the calibration text. The model is
distilled on the distillation text and evaluated on a DIFFERENT text against the original
sequential model: base / converted / converted+distilled perplexity, KL, top-1 agreement, steps,
tokens, wall time. Several runs (``--run``) are measured in one invocation, each from a fresh
copy of the converted model.

    python benchmarks/distill_quality.py --plan '{"groups": [[20,21],[22,23],[24,25],[26,27]]}' \\
        --eval-text ../shared/data/prideprejudice.txt --out reports/distill_quality.json
    python benchmarks/distill_quality.py --distill-text ../shared/data/sensesensibility.txt \\
        --run steps=200,lr=1e-3,rank=16 --run steps=200,lr=3e-4,rank=32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _parse_run(text: str) -> dict:
    out = {}
    for item in text.split(","):
        k, v = item.split("=")
        out[k.strip()] = v.strip() if k.strip() in ("target", "schedule") else float(v) if "." in v or "e" in v else int(v)
    return out


def main(argv=None) -> int:
    import torch

    from cqil_kernels.conversion import convert, revert
    from cqil_kernels.distill import distill
    from cqil_kernels.evaluate import base_log_probs, evaluate
    from cqil_kernels.loading import load_model
    from cqil_kernels.plan import CQILPlan
    from cqil_kernels.report import environment, format_table, write_json
    from cqil_kernels.texts import load_windows

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: embedded SmolLM2-135M")
    ap.add_argument("--plan", default=None, help="plan JSON file or inline JSON; default: search on --calib-text")
    ap.add_argument("--bypass", type=int, default=None, help="override the plan's bypass")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--calib-text", default=None, help="search text (default: --distill-text)")
    ap.add_argument("--distill-text", default=None, help="default: built-in text, calibration half")
    ap.add_argument("--eval-text", default=None, help="default: built-in text, evaluation half")
    ap.add_argument("--seq-len", type=int, default=256, help="distillation window length")
    ap.add_argument("--distill-windows", type=int, default=64)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--run", action="append", default=None,
                    help="distill settings k=v,... (steps, lr, rank, alpha, batch_size, target, temperature, "
                         "seed, schedule, max_seconds); repeatable. Default: steps=100,lr=1e-3,rank=16")
    ap.add_argument("--out", default="reports/distill_quality.json")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    progress = not args.no_progress
    if args.eval_text is not None and args.eval_text in (args.distill_text, args.calib_text):
        print("warning: evaluation text == distillation/calibration text: not held out", file=sys.stderr)

    t_start = time.perf_counter()
    model, tok = load_model(args.model)
    dwin = load_windows(tok, args.distill_text, split="calib", seq_len=args.seq_len, max_windows=args.distill_windows)
    ewin = load_windows(tok, args.eval_text, split="eval", seq_len=args.eval_seq_len, max_windows=args.eval_windows)

    if args.plan:
        text = Path(args.plan).read_text() if Path(args.plan).is_file() else args.plan
        plan = CQILPlan.from_dict(json.loads(text))
        search_info = None
    else:
        from cqil_kernels.search import search

        cwin = load_windows(tok, args.calib_text or args.distill_text, split="calib", seq_len=1024, max_windows=4)
        res = search(model, cwin, 2, args.groups, progress=progress, bypass=args.bypass or 0)
        plan, search_info = res.plan, {"seconds": res.seconds if hasattr(res, "seconds") else None, **res.calib}
    if args.bypass is not None:
        plan = CQILPlan(plan.groups, bypass=args.bypass)
    print(f"plan {plan.groups} bypass {plan.bypass}", file=sys.stderr)

    # the original model's held-out log-probs, once for every run
    base = base_log_probs(model, ewin, batch_size=2, progress=progress)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}  # each run starts from it
    convert(model, plan, backend="torch")
    converted = evaluate(model, ewin, base_model=base, batch_size=2, progress=progress).to_dict()

    runs = []
    for spec in args.run or ["steps=100,lr=1e-3,rank=16"]:
        kw = _parse_run(spec)
        revert(model)
        model.load_state_dict(original)
        convert(model, plan, backend="torch")
        r = distill(model, dwin, progress=progress, **kw)
        after = evaluate(r.model, ewin, base_model=base, batch_size=2, progress=progress).to_dict()
        d = r.to_dict()
        d["after"] = after
        d["spec"] = spec
        runs.append(d)
        print(f"{spec}: ppl {after['perplexity']:.3f} ({after['ppl_increase']*100:+.1f}%) kl {after['kl']:.4f} "
              f"top1 {after['top1_agreement']:.3f}; {r.steps} steps {r.seconds_per_step:.2f} s/step "
              f"(+{r.teacher_seconds:.0f} s teacher)", file=sys.stderr)
        del r

    header = ["model", "steps", "tokens", "train s", "s/step", "perplexity", "ppl %", "KL", "top-1"]
    rows = [["base", 0, 0, 0, 0, converted["base_perplexity"], 0.0, 0.0, 1.0],
            ["converted", 0, 0, 0, 0, converted["perplexity"], converted["ppl_increase"] * 100, converted["kl"],
             converted["top1_agreement"]]]
    for d in runs:
        a = d["after"]
        rows.append([f"distilled {d['spec']}", d["steps"], d["tokens_seen"], d["train_seconds"],
                     d["seconds_per_step"], a["perplexity"], a["ppl_increase"] * 100, a["kl"], a["top1_agreement"]])
    table = format_table(header, rows)
    report = {
        "model": args.model or "smollm2 (embedded SmolLM2-135M-Instruct)",
        "plan": plan.to_dict(),
        "search": search_info,
        "distill_text": dwin.to_dict(),
        "eval_text": ewin.to_dict(),
        "converted": converted,
        "runs": [{k: v for k, v in d.items() if k != "losses"} | {"losses_every_10": d["losses"][::10]} for d in runs],
        "wall_seconds": time.perf_counter() - t_start,
        "threads": torch.get_num_threads(),
        "table": table,
        "environment": environment(),
    }
    write_json(report, args.out)
    print(table)
    print(f"\nwall time {report['wall_seconds']:.0f} s; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
