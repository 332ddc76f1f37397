"""The main job (``python -m cqil_kernels main``, ``./run.sh``): one function per stage.

analyze + search on calibration text -> held-out evaluation of the plan and the best contiguous
window against one base pass -> generated samples -> the training-free correction -> distillation
on top -> table and reports -> the tuning table. Each stage's wall time, CPU time and peak memory
are recorded (:class:`_StageClock`). The argument parsing and the checks before loading are the
command line's (``cqil_kernels.cli``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .cli import (
    _calibrate_kwargs, _check_model_args, _check_out_dir, _check_out_file, _check_text_file, _groups_str, _load,
    _log, _num_layers, _progress, _resolve_layers, _search_kwargs, _windows, generate_text, run_distill_from_args,
)

__all__ = ["cmd_main", "main_tuning_table"]


# ---- the main job, one function per stage (search -> evaluate -> samples -> distill -> report)
class _StageClock:
    """Wall seconds, CPU seconds (user + sys, every thread) and peak memory of each stage.

    CPU seconds say what a stage costs when the machine is shared (wall time then grows with the
    other load; CPU time much less). Peak memory is the resident set's high-water mark, reset at
    the start of each stage where Linux allows it (``/proc/self/clear_refs``), else the process's.
    """

    def __init__(self):
        self.wall: dict = {}
        self.cpu: dict = {}
        self.peak_rss_mb: dict = {}
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()

    @contextmanager
    def __call__(self, name: str):
        _reset_peak_rss()
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = time.perf_counter() - w0
            self.cpu[name] = time.process_time() - c0
            self.peak_rss_mb[name] = _peak_rss_mb()

    def finish(self) -> None:
        self.wall["total"] = time.perf_counter() - self._t0
        self.cpu["total"] = time.process_time() - self._c0
        self.peak_rss_mb["total"] = max(self.peak_rss_mb.values(), default=_peak_rss_mb())


def _reset_peak_rss() -> None:
    # First hand the memory the previous stage freed back to the OS (Python's cycles, then glibc's
    # free heap pages): otherwise it stays resident and every later stage's peak starts above
    # what is live.
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _main_search(args, model, calib, exclude, out: Path):
    """Analyze + search on the calibration windows; writes analysis.json/.png, plan.json, search.json."""
    from .search import search

    result = search(model, calib, args.parallel, args.groups, args.budget, exclude=exclude, **_search_kwargs(args))
    result.analysis.to_json(out / "analysis.json")
    result.analysis.plot(out / "analysis.png", plan=result.plan)
    result.plan.to_json(out / "plan.json")
    result.to_json(out / "search.json")
    return result


def _main_evaluate(args, model, evalw, plans):
    """Held-out evaluation of ``plans`` against the base: one base pass keeps what the base's output
    head reads (``base_log_probs``), and each plan is measured against it; the distilled model is
    measured against the same base later, without another base pass. Full forwards (no prefix
    reuse), so that tokens/s are comparable. Returns (base EvalResult, plan EvalResults, the base's
    BaseLogProbs)."""
    from .evaluate import base_log_probs, evaluate, plan_applied

    progress = _progress(args)
    base = base_log_probs(model, evalw, batch_size=args.batch_size, progress=progress, backend=args.backend)
    evals = []
    for plan in plans:
        with plan_applied(model, plan, args.backend):
            evals.append(evaluate(model, evalw, base_model=base, batch_size=args.batch_size, progress=progress))
    return base.result, evals, base


def _main_samples(args, model, tok, plan) -> dict:
    from .evaluate import plan_applied

    samples = {}
    for name, p in (("base", None), ("cqil", plan)):
        with plan_applied(model, p, args.backend):
            samples[name] = generate_text(model, tok, args.prompt, args.max_new_tokens)
    return samples


def _main_distill(args, model, tok, plan, evalw, base, before, calibration=None):
    """LoRA + KL distillation of ``plan``, then the held-out evaluation against ``base`` (the
    original's BaseLogProbs). After it, reverting no longer gives the original model, so it runs
    after everything that needs the original (base numbers, samples). On top of a calibration the
    teacher is still the original model (``calibration.sequential_original``)."""
    from .evaluate import evaluate, plan_applied

    original = calibration.sequential_original(model) if calibration is not None else nullcontext()
    with original, plan_applied(model, plan, args.backend):
        res = run_distill_from_args(args, model, tok, plan)
        res.before = before.to_dict()
        res.after = evaluate(model, evalw, base_model=base, batch_size=args.batch_size,
                             progress=_progress(args)).to_dict()
    return res


def cmd_main(args) -> int:
    """analyze -> search -> convert -> evaluate on other text -> generate -> calibrate -> distill ->
    table + reports."""
    from .plan import CQILPlan
    from .report import environment, format_table, write_json

    clock = _StageClock()
    _check_model_args(args)
    for path, what in ((args.calib_text, "calibration text"), (args.eval_text, "evaluation text"),
                       (args.distill_text, "distillation text")):
        _check_text_file(path, what)
    _calibrate_kwargs(args)
    _check_out_dir(args.out, "--out")
    _check_out_file(args.distill_out, "--distill-out")
    if args.calib_text is not None and args.calib_text == args.eval_text:
        _log("warning: calibration and evaluation use the same file; the perplexity is not held out")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with clock("load"):
        model, tok = _load(args)
        n = _num_layers(model)
        exclude = _resolve_layers(args.exclude, n)
        calib = _windows(args, tok, args.calib_text, "calib", args.calib_windows)
        evalw = _windows(args, tok, args.eval_text, "eval", args.eval_windows)

    with clock("search"):  # the analysis included
        result = _main_search(args, model, calib, exclude, out)
    plan = result.plan
    # the contiguous comparison keeps the bypass its own measurement chose
    contiguous = (CQILPlan(result.best_contiguous["groups"], bypass=result.best_contiguous["bypass"])
                  if result.best_contiguous else None)
    with clock("evaluate"):
        base, evals, base_lp = _main_evaluate(args, model, evalw,
                                              [plan] + ([contiguous] if contiguous is not None else []))
    with clock("generate"):
        samples = _main_samples(args, model, tok, plan)
    # The training-free correction changes the weights, so it runs after everything that needs the
    # original (base numbers, samples); it is measured against the original's BaseLogProbs.
    cres = cal_eval = None
    if args.calibrate_windows > 0:
        with clock("calibrate"):
            cres, cal_eval, samples["cqil + calibration"] = _main_calibrate(args, model, tok, plan, evalw, base_lp)
        cres.to_json(out / "calibration.json")
    dres = None
    if args.distill_steps > 0:
        with clock("distill"):
            dres = _main_distill(args, model, tok, cres.plan if cres is not None else plan, evalw, base_lp,
                                 cal_eval if cal_eval is not None else evals[0], calibration=cres)

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
    if dres is not None:
        a = dres.after
        label = "cqil (search) + calibration + distilled" if cres is not None else "cqil (search) + distilled"
        rows.append([f"{label} {dres.steps} steps", _groups_str(plan.groups), n,
                     plan.num_sequential_steps(n), a["perplexity"], a["ppl_increase"] * 100,
                     a["kl"], a["top1_agreement"], None, None])
    table = format_table(header, rows)
    clock.finish()
    report = {
        "model": args.model or "smollm2 (embedded SmolLM2-135M-Instruct, GGUF Q4_1 dequantized)",
        "dtype": args.dtype,
        "num_layers": n,
        "plan": plan.to_dict(),
        "calibration": {"text": calib.to_dict(), **result.calib, "base_perplexity": result.base_perplexity,
                        "rank_metric": args.rank_metric},
        "best_contiguous_calibration": result.best_contiguous,
        "evaluation": {
            "text": evalw.to_dict(),
            "base": base.to_dict(),
            "search_plan": evals[0].to_dict(),
            "contiguous_plan": evals[1].to_dict() if contiguous is not None else None,
        },
        "calibration_correction": None if cres is None else {
            **cres.to_dict(), "held_out": cal_eval.to_dict()},
        "distillation": dres.to_dict() if dres is not None else None,
        "samples": samples,
        "timings_s": clock.wall,
        "cpu_s": clock.cpu,
        "peak_rss_mb": clock.peak_rss_mb,
        "table": table,
        "environment": environment(),
    }
    write_json(report, out / "main.json")
    print(table)
    print()
    for name, s in samples.items():
        print(f"--- {name}: {s['text']!r}")
    print(f"\nwall time {clock.wall['total']:.0f} s ({clock.cpu['total']:.0f} CPU s), peak memory "
          f"{clock.peak_rss_mb['total']:.0f} MB; reports in {out}/ (main.json, plan.json, search.json, "
          "analysis.json, analysis.png)")
    main_tuning_table(args, model, result, out)
    return 0


def _main_calibrate(args, model, tok, plan, evalw, base):
    """The training-free correction of the searched plan on ``--calibrate-windows`` windows of the
    calibration text, measured on the held-out windows against ``base`` (the original model's
    BaseLogProbs: no second base pass).

    Returns (CalibrationResult, held-out EvalResult, generated sample). The model is left converted
    to the calibrated plan; ``result.sequential_original(model)`` still gives the original model
    reverted (distillation's teacher).
    """
    from .calibrate import calibrate
    from .evaluate import evaluate

    fit_windows = _windows(args, tok, args.calib_text, "calib", args.calibrate_windows)
    result = calibrate(model, plan, fit_windows, batch_size=args.batch_size, backend=args.backend,
                       keep_original=True, progress=_progress(args), **_calibrate_kwargs(args))
    held_out = evaluate(model, evalw, base_model=base, batch_size=args.batch_size, progress=_progress(args))
    sample = generate_text(model, tok, args.prompt, args.max_new_tokens)
    return result, held_out, sample


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
