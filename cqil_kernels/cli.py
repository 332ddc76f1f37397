"""Command line: ``python -m cqil_kernels analyze|search|eval|generate|main|distill|tune``.

Every command works offline on the embedded SmolLM2-135M by default (``--model`` takes a local HF
directory or a .gguf file instead). Errors the user can fix (missing file, bad plan, unknown
model) print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .distill import add_distill_arguments, run_distill_from_args  # peft is imported only when distilling

__all__ = ["main", "build_parser", "generate_text"]

EXIT_USAGE = 2
DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."


class CLIError(Exception):
    """A problem with the user's input; printed without a traceback, exit status 2."""


# ------------------------------------------------------------------------------------ arguments
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _layer_list(text: str) -> list[int]:
    """``"0,1,-1"`` -> [0, 1, -1] (negative: counted from the last layer)."""
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def _common(parser: argparse.ArgumentParser, seq_len: int = 1024, max_windows: int | None = None) -> None:
    g = parser.add_argument_group("model and text")
    g.add_argument("--model", default=None, help="'smollm2' (default: embedded SmolLM2-135M-Instruct GGUF), "
                   "a local HuggingFace directory, or a .gguf file; never downloaded")
    g.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")
    g.add_argument("--backend", default="auto", help="CQIL backend for converted groups: auto, torch, triton")
    g.add_argument("--seq-len", type=_positive_int, default=seq_len, help=f"tokens per window (default {seq_len})")
    g.add_argument("--stride", type=_positive_int, default=None,
                   help="tokens between window starts (default: seq-len, non-overlapping)")
    g.add_argument("--max-windows", type=_positive_int, default=max_windows,
                   help=f"windows of text to use (default {max_windows or 'all'})")
    g.add_argument("--batch-size", type=_positive_int, default=2, help="windows per forward (default 2)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--traceback", action="store_true", help="show the full traceback of errors")


def _search_args(parser: argparse.ArgumentParser, groups_default: int | None) -> None:
    g = parser.add_argument_group("plan search")
    g.add_argument("--parallel", type=_positive_int, default=2, help="layers per group P (default 2)")
    g.add_argument("--groups", type=_positive_int, default=groups_default,
                   help=f"number of groups N (default {groups_default or 'as many as the budget allows'})")
    g.add_argument("--budget", type=_nonneg_float, default=None,
                   help="quality budget of the whole plan on calibration text: relative perplexity "
                   "increase (0.1 = +10%%) or mean KL in nats, see --budget-metric")
    g.add_argument("--budget-metric", choices=["ppl", "kl"], default="ppl", help="what --budget limits (default ppl)")
    g.add_argument("--rank-metric", choices=["kl", "ppl"], default="kl",
                   help="cost that ranks candidates (default kl: KL(base||converted))")
    g.add_argument("--exclude", type=_layer_list, default=[], help="layers no group may touch, e.g. 0,1,-1")
    g.add_argument("--bypass", type=int, default=0, help="bypass distance d (default 0: plain CQIL)")
    g.add_argument("--seed", type=int, default=0, help="tie-break seed (default 0)")
    g.add_argument("--beam", type=_positive_int, default=4, help="candidates measured jointly per step (default 4)")
    g.add_argument("--swap-rounds", type=int, default=0, help="rounds of trying to swap chosen groups (default 0)")
    g.add_argument("--contiguous-top", type=int, default=4,
                   help="contiguous windows measured for comparison (default 4; -1: all)")



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cqil_kernels",
        description="CQIL plan analysis, search, evaluation and generation (offline, CPU friendly).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("analyze", help="layer-input similarity and cost of every candidate group",
                       description="Measure cosine similarity of layer inputs and the cost of converting "
                       "each group of --parallel adjacent layers alone. Writes JSON and a PNG.")
    _common(p, max_windows=4)
    p.add_argument("--text", "--calib-text", dest="text", default=None,
                   help="calibration text file (UTF-8; default: built-in text, calibration half)")
    p.add_argument("--parallel", type=_positive_int, default=2, help="layers per group (default 2)")
    p.add_argument("--bypass", type=int, default=0, help="bypass distance d (default 0)")
    p.add_argument("--exclude", type=_layer_list, default=[], help="layers not to measure, e.g. 0,-1")
    p.add_argument("--no-costs", action="store_true", help="similarity only (one forward per window)")
    p.add_argument("--out", default="reports/analysis.json", help="JSON output (default reports/analysis.json)")
    p.add_argument("--plot", default=None, help="PNG output (default: --out with .png)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("search", help="choose a plan by measured cost",
                       description="Choose disjoint groups by measured cost on calibration text and "
                       "write the plan as {\"groups\": [[...], ...], \"bypass\": d}.")
    _common(p, max_windows=4)
    p.add_argument("--text", "--calib-text", dest="text", default=None,
                   help="calibration text file (default: built-in text, calibration half)")
    _search_args(p, groups_default=None)
    p.add_argument("--analysis", default=None, help="reuse an analysis JSON written by 'analyze'")
    p.add_argument("--out", default="plan.json", help="plan JSON output (default plan.json)")
    p.add_argument("--report", default=None, help="also write the full search report (JSON) here")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("eval", help="perplexity, KL and top-1 agreement of a plan",
                       description="Evaluate the model converted to --plan against its sequential self.")
    _common(p, max_windows=8)
    p.add_argument("--plan", default=None, help="plan JSON (default: none, the sequential model)")
    p.add_argument("--text", "--eval-text", dest="text", default=None,
                   help="evaluation text file (default: built-in text, evaluation half)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="greedy generation with a plan",
                       description="Greedy generation from a prompt (chat template when the tokenizer "
                       "has one), with the converted and, unless --no-base, the sequential model.")
    _common(p)
    p.add_argument("--plan", default=None, help="plan JSON (default: none, the sequential model)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt")
    p.add_argument("--max-new-tokens", type=_positive_int, default=48, help="tokens to generate (default 48)")
    p.add_argument("--no-chat-template", action="store_true", help="use the prompt as raw text")
    p.add_argument("--no-base", action="store_true", help="do not also generate with the sequential model")
    p.add_argument("--out", default=None, help="write prompt, outputs and tokens/s as JSON here")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("main", help="the whole job: analyze, search, convert, evaluate, generate, report",
                       description="End to end on the model: analyze and search on calibration text, "
                       "convert, evaluate on different text, generate a sample, print a table and "
                       "write JSON + PNG reports into --out.")
    _common(p, seq_len=512, max_windows=None)
    p.add_argument("--calib-text", default=None, help="calibration text (default: built-in, calibration half)")
    p.add_argument("--eval-text", default=None, help="evaluation text (default: built-in, evaluation half)")
    p.add_argument("--calib-windows", type=_positive_int, default=6, help="calibration windows (default 6)")
    p.add_argument("--eval-windows", type=_positive_int, default=12, help="evaluation windows (default 12)")
    _search_args(p, groups_default=4)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for the generated sample")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--out", default="reports", help="report folder (default reports/)")
    # On by default: the measured setting that recovers most within the CPU budget (SmolLM2, 4 pairs:
    # +24.7% -> +16.9% held-out perplexity, 60 steps on all layers, ~4 min); --distill-steps 0 skips it.
    add_distill_arguments(p, default_steps=60)
    add_main_tune_arguments(p)
    p.set_defaults(func=cmd_main, distill_lr=1e-3, distill_target="all")

    p = sub.add_parser("distill", help="recover quality: LoRA + KL distillation of a converted plan",
                       description="Convert to --plan, train LoRA adapters on calibration text to match "
                       "the unconverted model (KL), merge them, evaluate on --eval-text before and after, "
                       "and save the converted model to --out (reload with cqil_kernels.from_pretrained).")
    _common(p, seq_len=1024, max_windows=4)
    p.add_argument("--plan", required=True, help="plan JSON")
    p.add_argument("--text", "--calib-text", dest="text", default=None,
                   help="distillation text (default: built-in text, calibration half)")
    p.add_argument("--eval-text", default=None, help="evaluation text (default: built-in text, evaluation half)")
    p.add_argument("--out", default=None, help="save the distilled converted model here (save_pretrained)")
    add_distill_arguments(p, default_steps=200)
    p.set_defaults(func=cmd_distill)

    _add_tune_parser(sub)
    return parser


# ------------------------------------------------------------------------------------ helpers
def _progress(args) -> bool:
    return not args.no_progress


def _load(args):
    from .loading import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    _log(f"loaded {args.model or 'smollm2 (embedded)'}: {model.config.num_hidden_layers} layers "
         f"in {time.perf_counter() - t0:.1f} s")
    return model, tokenizer


def _windows(args, tokenizer, path, split, max_windows):
    from .texts import load_windows

    windows = load_windows(tokenizer, path, split=split, seq_len=args.seq_len, stride=args.stride,
                           max_windows=max_windows)
    _log(f"text {windows.source}: {len(windows)} windows x {windows.seq_len} tokens, {windows.num_scored} scored")
    return windows


def _resolve_layers(layers: list[int], num_layers: int) -> list[int]:
    out = []
    for v in layers:
        if not -num_layers <= v < num_layers:
            raise CLIError(f"layer {v} is out of range for a model with {num_layers} layers")
        out.append(v % num_layers)
    return sorted(set(out))


def _read_plan(path, num_layers: int):
    from .plan import CQILPlan

    if path is None:
        return None
    try:
        plan = CQILPlan.from_json(Path(path))
        plan.validate_for(num_layers)
    except (ValueError, TypeError) as e:
        raise CLIError(f"bad plan {path}: {e}") from None
    return plan


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _num_layers(model) -> int:
    from .conversion import decoder_layers

    return len(decoder_layers(model))


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 48, chat_template: bool = True) -> dict:
    """Greedy continuation of ``prompt``; returns text, token counts, seconds and tokens/s.

    With ``chat_template`` and a tokenizer that has one, the prompt is a user message.
    """
    import torch

    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not chat_template)
    device = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    return {
        "prompt": prompt,
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": int(new.numel()),
        "seconds": seconds,
        "tokens_per_second": new.numel() / seconds if seconds > 0 else 0.0,
    }


# ------------------------------------------------------------------------------------ commands
def cmd_analyze(args) -> int:
    from .analysis import analyze

    model, tok = _load(args)
    exclude = _resolve_layers(args.exclude, _num_layers(model))
    windows = _windows(args, tok, args.text, "calib", args.max_windows)
    result = analyze(model, windows, args.parallel, bypass=args.bypass, exclude=exclude,
                     measure_costs=not args.no_costs, batch_size=args.batch_size, progress=_progress(args),
                     backend=args.backend)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.to_json(out)
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    result.plot(png)
    from .report import format_table

    rows = [[f"{'-'.join(map(str, c.group))}", c.kl, c.ppl_increase * 100, c.top1_agreement,
             result.similarity[c.group[0]][c.group[-1]]] for c in result.ranked("kl")]
    print(format_table(["group", "KL", "ppl %", "top-1", "cos(in)"], rows))
    print(f"base perplexity {result.base_perplexity:.3f}; wrote {out} and {png}")
    return 0


def cmd_search(args) -> int:
    from .analysis import LayerAnalysis
    from .search import search

    if args.groups is None and args.budget is None:
        raise CLIError("give --groups N, --budget B, or both")
    analysis = None
    if args.analysis:
        if not Path(args.analysis).is_file():
            raise CLIError(f"analysis file not found: {args.analysis}")
        try:
            analysis = LayerAnalysis.from_json(args.analysis)
        except (ValueError, KeyError, TypeError) as e:
            raise CLIError(f"bad analysis file {args.analysis}: {e}") from None
    model, tok = _load(args)
    exclude = _resolve_layers(args.exclude, _num_layers(model))
    windows = _windows(args, tok, args.text, "calib", args.max_windows)
    result = search(model, windows, args.parallel, args.groups, args.budget, budget_metric=args.budget_metric,
                    rank_metric=args.rank_metric, exclude=exclude, bypass=args.bypass, seed=args.seed,
                    beam=args.beam, swap_rounds=args.swap_rounds,
                    contiguous_top=None if args.contiguous_top < 0 else args.contiguous_top,
                    analysis=analysis, batch_size=args.batch_size, progress=_progress(args), backend=args.backend)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.plan.to_json(out)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        result.to_json(args.report)
    _print_search(result, _num_layers(model))
    print(f"wrote {out}" + (f" and {args.report}" if args.report else ""))
    return 0


def _print_search(result, num_layers: int) -> None:
    from .report import format_table

    rows = [["search", _groups_str(result.plan.groups), result.plan.num_sequential_steps(num_layers),
             result.calib["ppl_increase"] * 100, result.calib["kl"], result.calib["top1_agreement"]]]
    if result.best_contiguous:
        c = result.best_contiguous
        rows.append(["best contiguous", _groups_str(c["groups"]), num_layers - sum(len(g) - 1 for g in c["groups"]),
                     c["ppl_increase"] * 100, c["kl"], c["top1_agreement"]])
    print(format_table(["calibration", "groups", "steps", "ppl %", "KL", "top-1"], rows))


def _groups_str(groups) -> str:
    return " ".join(f"{g[0]}-{g[-1]}" for g in groups) or "(none)"


def cmd_eval(args) -> int:
    from .evaluate import compare_plans
    from .report import format_table

    model, tok = _load(args)
    plan = _read_plan(args.plan, _num_layers(model))
    windows = _windows(args, tok, args.text, "eval", args.max_windows)
    base, (conv,) = compare_plans(model, windows, [plan], batch_size=args.batch_size, progress=_progress(args),
                                  backend=args.backend, reuse_prefix=False, desc="evaluating")
    n = _num_layers(model)
    steps = plan.num_sequential_steps(n) if plan else n
    print(format_table(
        ["model", "groups", "steps", "perplexity", "ppl %", "KL", "top-1", "tok/s (fwd)"],
        [["base", "(none)", n, base.perplexity, 0.0, 0.0, 1.0, base.tokens_per_second],
         ["cqil", _groups_str(plan.groups) if plan else "(none)", steps, conv.perplexity, conv.ppl_increase * 100,
          conv.kl, conv.top1_agreement, conv.tokens_per_second]]))
    if args.out:
        from .report import environment, write_json

        write_json({"plan": plan.to_dict() if plan else None, "text": windows.to_dict(), "base": base.to_dict(),
                    "converted": conv.to_dict(), "environment": environment()}, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_generate(args) -> int:
    from .evaluate import plan_applied

    model, tok = _load(args)
    plan = _read_plan(args.plan, _num_layers(model))
    results = {}
    variants = [("cqil", plan)] + ([] if args.no_base or plan is None else [("base", None)])
    for name, p in variants:
        with plan_applied(model, p, args.backend):
            results[name] = generate_text(model, tok, args.prompt, args.max_new_tokens, not args.no_chat_template)
    for name, r in results.items():
        label = name if plan is not None else "base"
        print(f"--- {label} ({r['new_tokens']} tokens, {r['tokens_per_second']:.1f} tok/s)")
        print(r["text"])
    if args.out:
        from .report import environment, write_json

        write_json({"plan": plan.to_dict() if plan else None, "outputs": results, "environment": environment()},
                   args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_main(args) -> int:
    """analyze -> search -> convert -> evaluate on other text -> generate -> table + reports."""
    from .evaluate import compare_plans, plan_applied
    from .plan import CQILPlan
    from .report import environment, format_table, write_json
    from .search import search

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.calib_text is not None and args.calib_text == args.eval_text:
        _log("warning: calibration and evaluation use the same file; the perplexity is not held out")
    timings = {}
    model, tok = _load(args)
    timings["load"] = time.perf_counter() - t_start
    n = _num_layers(model)
    exclude = _resolve_layers(args.exclude, n)
    calib = _windows(args, tok, args.calib_text, "calib", args.calib_windows)
    evalw = _windows(args, tok, args.eval_text, "eval", args.eval_windows)

    t0 = time.perf_counter()
    result = search(model, calib, args.parallel, args.groups, args.budget, budget_metric=args.budget_metric,
                    rank_metric=args.rank_metric, exclude=exclude, bypass=args.bypass, seed=args.seed,
                    beam=args.beam, swap_rounds=args.swap_rounds,
                    contiguous_top=None if args.contiguous_top < 0 else args.contiguous_top,
                    batch_size=args.batch_size, progress=_progress(args), backend=args.backend)
    timings["analyze"] = result.analysis.seconds
    timings["search"] = time.perf_counter() - t0 - result.analysis.seconds
    plan = result.plan
    result.analysis.to_json(out / "analysis.json")
    result.analysis.plot(out / "analysis.png")
    plan.to_json(out / "plan.json")
    result.to_json(out / "search.json")

    # Held-out evaluation: the found plan and the best contiguous plan against the base, one base
    # forward per batch for both; full forwards (no prefix reuse) so that tokens/s are comparable.
    t0 = time.perf_counter()
    contiguous = CQILPlan(result.best_contiguous["groups"], bypass=plan.bypass) if result.best_contiguous else None
    plans = [plan] + ([contiguous] if contiguous is not None else [])
    base, evals = compare_plans(model, evalw, plans, batch_size=args.batch_size, progress=_progress(args),
                                backend=args.backend, reuse_prefix=False, desc="held-out evaluation")
    timings["evaluate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    samples = {}
    for name, p in (("base", None), ("cqil", plan)):
        with plan_applied(model, p, args.backend):
            samples[name] = generate_text(model, tok, args.prompt, args.max_new_tokens)
    timings["generate"] = time.perf_counter() - t0

    # Optional: recover quality with LoRA + KL distillation. After it, reverting no longer gives the
    # original model, so it runs after everything that needs the original (base numbers, samples);
    # its before/after numbers are measured against the original's log-probs.
    distilled = None
    if args.distill_steps > 0:
        t0 = time.perf_counter()
        with plan_applied(model, plan, args.backend):
            dres = run_distill_from_args(args, model, tok, plan, eval_windows=evalw)
        distilled = dres.after
        timings["distill"] = time.perf_counter() - t0

    header = ["model", "groups", "layers", "seq. steps", "perplexity", "ppl %", "KL", "top-1",
              "fwd tok/s", "gen tok/s"]
    rows = [["base", "(none)", n, n, base.perplexity, 0.0, 0.0, 1.0, base.tokens_per_second,
             samples["base"]["tokens_per_second"]],
            ["cqil (search)", _groups_str(plan.groups), n, plan.num_sequential_steps(n), evals[0].perplexity,
             evals[0].ppl_increase * 100, evals[0].kl, evals[0].top1_agreement, evals[0].tokens_per_second,
             samples["cqil"]["tokens_per_second"]]]
    if contiguous is not None:
        rows.append(["cqil (contiguous)", _groups_str(contiguous.groups), n, contiguous.num_sequential_steps(n),
                     evals[1].perplexity, evals[1].ppl_increase * 100, evals[1].kl, evals[1].top1_agreement,
                     evals[1].tokens_per_second, None])
    if distilled is not None:
        rows.append([f"cqil (search) + distilled {dres.steps} steps", _groups_str(plan.groups), n,
                     plan.num_sequential_steps(n), distilled["perplexity"], distilled["ppl_increase"] * 100,
                     distilled["kl"], distilled["top1_agreement"], None, None])
    table = format_table(header, rows)
    timings["total"] = time.perf_counter() - t_start
    report = {
        "model": args.model or "smollm2 (embedded SmolLM2-135M-Instruct, GGUF Q4_1 dequantized)",
        "dtype": args.dtype,
        "num_layers": n,
        "plan": plan.to_dict(),
        "calibration": {"text": calib.to_dict(), **result.calib, "base_perplexity": result.base_perplexity},
        "best_contiguous_calibration": result.best_contiguous,
        "evaluation": {
            "text": evalw.to_dict(),
            "base": base.to_dict(),
            "search_plan": evals[0].to_dict(),
            "contiguous_plan": evals[1].to_dict() if contiguous is not None else None,
        },
        "distillation": dres.to_dict() if distilled is not None else None,
        "samples": samples,
        "timings_s": timings,
        "table": table,
        "environment": environment(),
    }
    write_json(report, out / "main.json")
    print(table)
    print()
    for name, s in samples.items():
        print(f"--- {name}: {s['text']!r}")
    print(f"\nwall time {timings['total']:.0f} s; reports in {out}/ (main.json, plan.json, search.json, "
          "analysis.json, analysis.png)")
    main_tuning_table(args, model, result, out)
    return 0


def cmd_distill(args) -> int:
    """convert to --plan -> LoRA + KL distillation -> held-out before/after -> save."""
    model, tok = _load(args)
    plan = _read_plan(args.plan, _num_layers(model))
    evalw = _windows(args, tok, args.eval_text, "eval", args.max_windows)
    res = run_distill_from_args(args, model, tok, plan, eval_windows=evalw)
    before, after = res.before, res.after
    print(f"distilled {res.steps} steps ({res.tokens_seen} tokens, {res.train_seconds:.0f} s): held-out perplexity "
          f"+{before['ppl_increase']:.1%} -> +{after['ppl_increase']:.1%}, KL {before['kl']:.4f} -> {after['kl']:.4f}")
    if args.out:
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
        print(f"saved the distilled converted model to {args.out}")
    return 0


# ------------------------------------------------------------------------------------ tune
def _int_list(text: str) -> list[int]:
    """``"1,4"`` -> [1, 4] (positive integers)."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _add_tune_parser(sub) -> None:
    p = sub.add_parser(
        "tune", help="measure candidate plans for latency here and quality on text; recommend one",
        description="Candidate plans (no groups; search results for N = 1..--max-groups at each --parallel; "
        "the paper's S/E/P plans; --plans files) are timed with DecodeEngine on --device (CUDA graph on a GPU, "
        "eager on the CPU) and measured for quality on calibration text (search's measurements reused). "
        "Prints a Pareto table, writes tune.json, tune.png and the recommended plan.json (fastest within the "
        "quality budget) into --out. With --kernels: sweep kernel tiles on a GPU and write the per-device "
        "launch-config file instead.")
    _common(p, max_windows=4)
    p.add_argument("--text", "--calib-text", dest="text", default=None,
                   help="calibration text file (default: built-in text, calibration half)")
    g = p.add_argument_group("candidate plans")
    g.add_argument("--parallel", type=_int_list, default=[2, 3, 4], help="group sizes P to search (default 2,3,4)")
    g.add_argument("--max-groups", type=_positive_int, default=4, help="search N = 1..this many groups (default 4)")
    g.add_argument("--plans", nargs="+", default=[], metavar="PLAN_JSON", help="also measure these plan files")
    g.add_argument("--no-search", action="store_true", help="no search: no groups, paper plans and --plans only")
    g.add_argument("--no-paper", action="store_true", help="leave out the paper's S/E/P plans")
    g.add_argument("--exclude", type=_layer_list, default=[], help="layers no searched group may touch")
    g.add_argument("--bypass", type=int, default=0, help="bypass distance d of searched plans (default 0)")
    g.add_argument("--beam", type=_positive_int, default=4, help="search: candidates measured per step (default 4)")
    g.add_argument("--seed", type=int, default=0, help="search tie-break seed (default 0)")
    g = p.add_argument_group("latency (measured on --device)")
    g.add_argument("--batch-sizes", type=_int_list, default=[1], help="decode batch sizes (default 1; the first ranks)")
    g.add_argument("--context-lengths", type=_int_list, default=[128],
                   help="decode context (cache) lengths (default 128; the first ranks)")
    g.add_argument("--prompt-len", type=_positive_int, default=128, help="prefill prompt length (default 128)")
    g.add_argument("--decode-steps", type=_positive_int, default=16, help="decode steps per repeat (default 16)")
    g.add_argument("--repeats", type=_positive_int, default=5, help="timed repeats after a warm-up (default 5)")
    g.add_argument("--launch-config", default=None, help="launch-config JSON the engine runs under "
                   "(default: the device's tuned file in the package, else the heuristics)")
    g.add_argument("--world-size", type=int, default=None,
                   help="add the MODELED step on W devices (cqil_kernels.distributed.latency_model)")
    g.add_argument("--allreduce-us", type=_nonneg_float, default=20.0,
                   help="all-reduce latency assumed by --world-size (default 20 us: NCCL on H100 NVLink)")
    g = p.add_argument_group("recommendation")
    g.add_argument("--budget-ppl", type=_nonneg_float, default=None,
                   help="largest relative perplexity increase on calibration text (default 0.10 = +10%%)")
    g.add_argument("--budget-kl", type=_nonneg_float, default=None, help="or: largest mean KL (nats/token)")
    p.add_argument("--out", default="reports/tune", help="folder for tune.json, tune.png, plan.json (default reports/tune)")
    g = p.add_argument_group("kernel tuning (GPU)")
    g.add_argument("--kernels", action="store_true",
                   help="sweep tiles, warps, stages and split counts of the model's decode GEMMs (M = batch) and "
                   "write the per-device launch-config JSON into --out (CUDA only)")
    g.add_argument("--install", action="store_true",
                   help="with --kernels: also copy the file into the package, where launches on this device find it")
    g.add_argument("--time-budget", type=_nonneg_float, default=420.0,
                   help="with --kernels: stop sweeping after this many seconds, keeping the best so far (default 420)")
    g.add_argument("--quick", action="store_true", help="with --kernels: a small candidate grid")
    g.add_argument("--kernel-dtype", default="bfloat16", help="with --kernels: the weights' dtype (default bfloat16)")
    p.set_defaults(func=cmd_tune)


def _tune_budget(args) -> dict:
    if args.budget_ppl is not None and args.budget_kl is not None:
        raise CLIError("give one quality budget: --budget-ppl or --budget-kl")
    return {"budget_ppl": args.budget_ppl, "budget_kl": args.budget_kl}


def cmd_tune(args) -> int:
    """candidates -> quality (cached, search's reused) -> latency here -> Pareto table, plot, plan.json."""
    if args.kernels:
        return _cmd_tune_kernels(args)
    from .tuning import Candidate, tune

    budget = _tune_budget(args)
    if args.world_size is not None and args.world_size < 2:
        raise CLIError(f"--world-size must be >= 2 (the modeled devices), got {args.world_size}")
    if args.launch_config is not None and not Path(args.launch_config).is_file():
        raise CLIError(f"launch config not found: {args.launch_config}")
    model, tok = _load(args)
    n = _num_layers(model)
    plans = [Candidate(f"file {Path(path).stem}", _read_plan(path, n), f"file {path}") for path in args.plans]
    exclude = _resolve_layers(args.exclude, n)
    windows = _windows(args, tok, args.text, "calib", args.max_windows)
    t0 = time.perf_counter()
    result = tune(model, windows, parallel=args.parallel, max_groups=args.max_groups, plans=plans,
                  run_search=not args.no_search, include_paper=not args.no_paper, **budget,
                  batch_sizes=args.batch_sizes, context_lengths=args.context_lengths, prompt_len=args.prompt_len,
                  decode_steps=args.decode_steps, repeats=args.repeats, world_size=args.world_size,
                  allreduce_us=args.allreduce_us, backend=args.backend, launch_config=args.launch_config,
                  search_kwargs=dict(exclude=exclude, bypass=args.bypass, beam=args.beam, seed=args.seed),
                  batch_size=args.batch_size, progress=_progress(args))
    print(result.table())
    paths = result.write(args.out)
    print(f"tuned in {time.perf_counter() - t0:.0f} s; wrote {paths['json']}, {paths['png']} and {paths['plan']} "
          f"(python -m cqil_kernels convert/eval --plan {paths['plan']})")
    return 0


def _cmd_tune_kernels(args) -> int:
    import torch

    from . import kernel_tuning

    device = torch.device(args.device)
    if device.type != "cuda":
        raise CLIError(f"tune --kernels needs a CUDA GPU (--device cuda), not {device}: Triton interpreter timings "
                       "on a CPU say nothing about the GPU kernels")
    if not torch.cuda.is_available():
        raise CLIError("tune --kernels: CUDA is not available in this torch build or machine")
    from .loading import load_model, parse_dtype

    model, _ = load_model(args.model, dtype="float32", device="cpu")  # only its shapes are used
    result = kernel_tuning.tune_kernels(model.config, device=device, dtype=parse_dtype(args.kernel_dtype),
                                        batch_sizes=args.batch_sizes,
                                        parallel=[1] + [p for p in args.parallel if p > 1],
                                        context_length=args.context_lengths[0], quick=args.quick,
                                        time_budget_s=args.time_budget, progress=_progress(args))
    print(result.table())
    paths = result.write(args.out, install=args.install)
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


def add_main_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """The main job's closing tuning table (``main_tuning_table``)."""
    g = parser.add_argument_group("closing tuning table (latency of the measured plans on --device)")
    g.add_argument("--no-tune", action="store_true", help="skip the closing latency / quality table")
    g.add_argument("--tune-budget-ppl", type=_nonneg_float, default=0.10,
                   help="quality budget of its recommendation (calibration perplexity change, default 0.10)")
    g.add_argument("--tune-context", type=_positive_int, default=64, help="its decode context length (default 64)")
    g.add_argument("--tune-steps", type=_positive_int, default=8, help="its decode steps per repeat (default 8)")
    g.add_argument("--tune-repeats", type=_positive_int, default=3, help="its timed repeats (default 3)")


def main_tuning_table(args, model, search_result, out) -> dict | None:
    """The main job's last step: the plans its search already measured (no groups, the best plan of
    every N, the best contiguous window) timed here, their calibration quality reused as measured
    (nothing is re-measured), printed as a Pareto table; tune.json, tune.png and tune_plan.json into
    ``out``. Returns the written paths (None with --no-tune)."""
    if args.no_tune:
        return None
    from .plan import CQILPlan
    from .tuning import Candidate, QualityCache, search_candidates, tune

    t0 = time.perf_counter()
    quality = QualityCache(search_result.settings.get("text"))
    quality.add_search(search_result)
    candidates = [Candidate("no groups", CQILPlan.sequential(), "baseline")]
    candidates += search_candidates(search_result, _num_layers(model))
    result = tune(model, None, candidates=candidates, quality=quality, budget_ppl=args.tune_budget_ppl,
                  context_lengths=(args.tune_context,), prompt_len=args.tune_context, decode_steps=args.tune_steps,
                  repeats=args.tune_repeats, backend=args.backend, progress=_progress(args))
    paths = result.write(out, plan_name="tune_plan.json")
    print()
    print(result.table())
    print(f"tuning table: {time.perf_counter() - t0:.0f} s ({len(candidates)} plans, quality from the search above); "
          f"wrote {paths['json']}, {paths['png']}, {paths['plan']}")
    return paths


# ------------------------------------------------------------------------------------ entry point
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ImportError, ValueError, TypeError) as e:
        # Raised by loading, texts and plan validation with messages that name the problem.
        if getattr(args, "traceback", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
