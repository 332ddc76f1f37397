"""Command line: ``python -m cqil_kernels analyze|search|eval|generate|calibrate|distill|main``.

Every command works offline on the embedded SmolLM2-135M by default (``--model`` takes a local HF
directory or a .gguf file instead). Errors the user can fix (missing file, bad plan, unknown
model) print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
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
    g.add_argument("--corrected", action="store_true",
                   help="rank candidates by their cost after the training-free correction (calibrate): "
                   "every measured plan is calibrated first (slower)")


def _calibrate_args(parser: argparse.ArgumentParser) -> None:
    """The options of the training-free correction (``cqil_kernels.calibrate``)."""
    from .calibrate import FOLDS, MAPS, TARGETS

    g = parser.add_argument_group("training-free correction (calibrate)")
    g.add_argument("--map", choices=MAPS, default="full",
                   help="the correction per group: full H x H (default), lowrank, or diagonal (per channel)")
    g.add_argument("--rank", type=_positive_int, default=64, help="rank of --map lowrank (default 64)")
    g.add_argument("--target", choices=TARGETS, default="normalized",
                   help="fit errors as the next layer's norm sees them (normalized, default) or on the residual stream")
    g.add_argument("--fold", choices=FOLDS, default="both",
                   help="fold into o_proj and down_proj (both, default) or down_proj only (mlp: exact, weaker)")
    g.add_argument("--bypass-choice", choices=["search", "plan"], default="search",
                   help="search: try d = 0..P-1 per group and keep the best after correction (default); "
                   "plan: the plan's own bypass")
    g.add_argument("--ridge", type=_nonneg_float, default=None,
                   help="ridge strength relative to the mean diagonal (default: chosen on held-back windows)")
    g.add_argument("--refit", type=int, default=0, help="extra fits per group with the map folded in (default 0)")
    g.add_argument("--holdout", type=float, default=0.25,
                   help="fraction of the windows held back to choose the ridge and d (default 0.25)")


def _calibrate_kwargs(args) -> dict:
    if args.ridge is not None and args.ridge <= 0:
        raise CLIError(f"--ridge must be > 0, got {args.ridge}")
    if args.refit < 0:
        raise CLIError(f"--refit must be >= 0, got {args.refit}")
    if not 0 <= args.holdout < 1:
        raise CLIError(f"--holdout must be in [0, 1), got {args.holdout}")
    return dict(map=args.map, rank=args.rank, target=args.target, fold=args.fold, bypass=args.bypass_choice,
                ridge=args.ridge, refit=args.refit, holdout=args.holdout)



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

    _add_calibrate_command(sub)

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
    p.add_argument("--calibrate-windows", type=int, default=16,
                   help="windows of the calibration text (seq-len tokens each) for the training-free correction "
                   "of the searched plan (default 16, about a minute on 2 CPU cores; 0: no correction)")
    _calibrate_args(p)
    # On by default: the measured setting that recovers most within the CPU budget (SmolLM2, 4 pairs:
    # +24.7% -> +16.9% held-out perplexity, 60 steps on all layers, ~4 min); --distill-steps 0 skips it.
    add_distill_arguments(p, default_steps=60)
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
    return parser


def _add_calibrate_command(sub) -> None:
    p = sub.add_parser("calibrate", help="training-free correction of a plan, folded into the weights",
                       description="Fit a linear correction per group of --plan on calibration text (closed form, "
                       "ridge toward the identity), fold it into each group's o_proj/down_proj, choose the bypass "
                       "per group by measurement, and save the corrected converted model to --out (plain weights, "
                       "the plan in config.json: reload with cqil_kernels.from_pretrained).")
    _common(p, seq_len=512, max_windows=16)
    p.add_argument("--plan", required=True, help="plan JSON")
    p.add_argument("--text", "--calib-text", dest="text", default=None,
                   help="calibration text (default: built-in text, calibration half)")
    p.add_argument("--eval-text", default=None,
                   help="also measure the plan before and after on this held-out text (never the calibration text)")
    p.add_argument("--eval-windows", type=_positive_int, default=8, help="held-out windows (default 8)")
    p.add_argument("--out", default=None, help="save the calibrated model and tokenizer here (save_pretrained)")
    p.add_argument("--report", default=None, help="write the calibration result (JSON) here")
    _calibrate_args(p)
    p.set_defaults(func=cmd_calibrate)


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
                    analysis=analysis, batch_size=args.batch_size, progress=_progress(args), backend=args.backend,
                    corrected=args.corrected)
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
    """analyze -> search -> convert -> evaluate on other text -> generate -> calibrate -> evaluate ->
    distill -> table + reports."""
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
                    batch_size=args.batch_size, progress=_progress(args), backend=args.backend,
                    corrected=args.corrected)
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
    contiguous = (CQILPlan(result.best_contiguous["groups"], bypass=result.best_contiguous["bypass"])
                  if result.best_contiguous else None)
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

    # The training-free correction (calibrate): after it the weights differ from the original, so
    # it runs after everything that needs the original plain (base numbers, samples); its held-out
    # numbers are measured against the original model (result.sequential_original).
    cres = cal_eval = None
    if args.calibrate_windows > 0:
        t0 = time.perf_counter()
        cres, cal_eval, samples["cqil + calibration"] = _main_calibrate(args, model, tok, plan, evalw)
        cres.to_json(out / "calibration.json")
        timings["calibrate"] = time.perf_counter() - t0

    # Optional: recover quality with LoRA + KL distillation, on top of the calibration when there is
    # one. After it, reverting no longer gives the original model, so it runs after everything that
    # needs the original; its before/after numbers are measured against the original's log-probs,
    # and its teacher is the original model (with calibration: through sequential_original).
    distilled = None
    if args.distill_steps > 0:
        t0 = time.perf_counter()
        dplan = cres.plan if cres is not None else plan
        with (cres.sequential_original(model) if cres is not None else nullcontext()), \
                plan_applied(model, dplan, args.backend):
            dres = run_distill_from_args(args, model, tok, dplan, eval_windows=evalw)
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
    if cal_eval is not None:
        rows.append(["cqil (search) + calibration", _groups_str(plan.groups), n, plan.num_sequential_steps(n),
                     cal_eval.perplexity, cal_eval.ppl_increase * 100, cal_eval.kl, cal_eval.top1_agreement, None,
                     samples["cqil + calibration"]["tokens_per_second"]])
    if distilled is not None:
        label = "cqil (search) + calibration + distilled" if cres is not None else "cqil (search) + distilled"
        rows.append([f"{label} {dres.steps} steps", _groups_str(plan.groups), n,
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
        "calibration_correction": None if cres is None else {
            **cres.to_dict(), "held_out": cal_eval.to_dict()},
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
    return 0


def _print_calibration(result) -> None:
    from .report import format_table

    rows = []
    for g in result.groups:
        rows.append([_groups_str([g.group]), g.bypass, g.ridge, g.plain_error, g.corrected_error,
                     g.fold_gap, g.tokens.get("fit"), g.seconds])
    print(format_table(["group", "d", "ridge", "err plain", "err corrected", "fold gap", "fit tokens", "s"], rows))
    print(f"calibrated {len(result.groups)} groups in {result.seconds:.1f} s ({result.settings['map']} map, "
          f"{result.settings['target']} target, fold {result.settings['fold']}); errors: held-back output error "
          "relative to the sequential delta")


def cmd_calibrate(args) -> int:
    """--plan + calibration text -> fit + fold per group -> (held-out before/after) -> save."""
    from .calibrate import calibrate
    from .evaluate import compare_plans

    options = _calibrate_kwargs(args)
    if args.text is not None and args.text == args.eval_text:
        raise CLIError("--eval-text is the calibration text: a held-out measure needs another text")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise CLIError(f"--out {args.out} exists and is not a folder")
    model, tok = _load(args)
    plan = _read_plan(args.plan, _num_layers(model))
    if not plan.parallel_groups:
        raise CLIError(f"plan {args.plan} has no group of 2 or more layers: nothing to calibrate")
    windows = _windows(args, tok, args.text, "calib", args.max_windows)
    evalw = _windows(args, tok, args.eval_text, "eval", args.eval_windows) if args.eval_text else None
    plain = None
    if evalw is not None:
        base, (plain,) = compare_plans(model, evalw, [plan], batch_size=args.batch_size, progress=_progress(args),
                                       backend=args.backend, desc="held-out, before")
    result = calibrate(model, plan, windows, batch_size=args.batch_size, backend=args.backend,
                       keep_original=evalw is not None, progress=_progress(args), **options)
    _print_calibration(result)
    if evalw is not None:
        with result.sequential_original(model):
            _, (after,) = compare_plans(model, evalw, [result.plan], batch_size=args.batch_size,
                                        progress=_progress(args), backend=args.backend, desc="held-out, after")
        result.original_weights = None  # not saved, not needed any more
        print(f"held-out {evalw.source}: perplexity {plain.ppl_increase:+.1%} -> {after.ppl_increase:+.1%}, "
              f"KL {plain.kl:.4f} -> {after.kl:.4f}, top-1 {plain.top1_agreement:.3f} -> {after.top1_agreement:.3f} "
              f"(base perplexity {base.perplexity:.3f})")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        result.to_json(args.report)
    if args.out:
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
        print(f"saved the calibrated model to {args.out} (plan {result.plan.to_json()}; "
              "reload with cqil_kernels.from_pretrained)")
    return 0


def _main_calibrate(args, model, tok, plan, evalw):
    """The training-free correction of the searched plan on ``--calibrate-windows`` windows of the
    calibration text, measured on the held-out windows against the original model.

    Returns (CalibrationResult, held-out EvalResult, generated sample). The model is left converted
    to the calibrated plan; ``result.sequential_original(model)`` still gives the original model
    reverted (the base of the held-out measure, and distillation's teacher).
    """
    from .calibrate import calibrate
    from .evaluate import compare_plans

    fit_windows = _windows(args, tok, args.calib_text, "calib", args.calibrate_windows)
    result = calibrate(model, plan, fit_windows, batch_size=args.batch_size, backend=args.backend,
                       keep_original=True, progress=_progress(args), **_calibrate_kwargs(args))
    with result.sequential_original(model):
        # prefix reuse: the layers before the first group compute the same in both models
        _, (held_out,) = compare_plans(model, evalw, [result.plan], batch_size=args.batch_size,
                                       progress=_progress(args), backend=args.backend,
                                       desc="held-out evaluation (calibrated)")
    sample = generate_text(model, tok, args.prompt, args.max_new_tokens)
    return result, held_out, sample


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
