"""Plan search: which groups of adjacent layers to run concurrently, chosen by measured cost.

Single-group costs come from ``analyze`` (each candidate converted alone on calibration text).
They do not add up: converting several groups compounds the error, sometimes far beyond the sum.
So the search is greedy with re-measurement: at every step the ``beam`` cheapest candidates that
fit (disjoint from the chosen groups, touching no excluded layer) are each measured *together with
the groups already chosen*, and the best combination is kept. A quality budget stops the search
when no combination fits it. An optional swap pass then tries to replace each chosen group by an
unused candidate and keeps any swap that lowers the measured cost of the whole plan.

For comparison the paper's contiguous plans (``CQILPlan.contiguous``: runs of P layers in one
window) with the same number of groups are measured the same way.

``corrected=True`` ranks by the cost *after* the training-free correction of ``calibrate``
(the best pairs to correct need not be the best pairs uncorrected): every measured combination
is calibrated on the calibration windows (fit, fold, bypass per group chosen by measurement),
measured against the original model, and restored. Single candidates are ordered by a
prediction: their measured uncorrected cost times the factor by which the correction shrinks
their output error (``correction_gains``: one pass, no evaluation). The costs of a corrected
search are in-sample (fitted and measured on the same windows); evaluate on other text.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from .analysis import METRICS, LayerAnalysis, analyze
from .conversion import decoder_layers
from .evaluate import EvalResult, compare_plans
from .plan import CQILPlan

__all__ = ["SearchResult", "search", "contiguous_plans"]


def _metric(result: EvalResult, name: str) -> float:
    if name == "kl":
        return result.kl
    if name == "ppl":
        return result.ppl_increase
    raise ValueError(f"unknown metric {name!r}; use one of {METRICS}")


def _summary(plan: CQILPlan, result: EvalResult, predicted_kl: float, predicted_ppl: float) -> dict:
    return {
        "groups": [list(g) for g in plan.groups],
        "bypass": plan.to_dict()["bypass"],
        "perplexity": result.perplexity,
        "ppl_increase": result.ppl_increase,
        "kl": result.kl,
        "top1_agreement": result.top1_agreement,
        "predicted_kl": predicted_kl,
        "predicted_ppl_increase": predicted_ppl,
    }


@dataclass
class SearchResult:
    """Result of ``search``.

    Attributes:
        plan: the chosen CQILPlan (groups sorted by layer).
        calib: the plan measured on the calibration windows: perplexity, ppl_increase, kl,
            top1_agreement, and the sums of single-group costs it was predicted to have.
        steps: one record per measured combination (step, groups, metrics, accepted).
        contiguous: the paper's contiguous plans with as many groups, each with its prediction
            and, when measured, the same metrics; ``best_contiguous`` is the best measured one.
        analysis: the LayerAnalysis the search started from.
        settings: the arguments of the search.
    """

    plan: CQILPlan
    calib: dict
    steps: list = field(default_factory=list)
    contiguous: list = field(default_factory=list)
    best_contiguous: dict | None = None
    analysis: LayerAnalysis | None = None
    settings: dict = field(default_factory=dict)
    base_perplexity: float | None = None
    seconds: float = 0.0
    gains: dict | None = None

    @property
    def rank_metric(self) -> str:
        """The cost that ranked candidates: "kl" or "ppl"."""
        return self.settings.get("rank_metric", "kl")

    @property
    def corrected(self) -> bool:
        """Whether costs were measured after the training-free correction (``calibrate``)."""
        return bool(self.settings.get("corrected", False))

    def to_dict(self, include_analysis: bool = False) -> dict:
        d = {
            "plan": self.plan.to_dict(),
            "calib": self.calib,
            "base_perplexity": self.base_perplexity,
            "best_contiguous": self.best_contiguous,
            "contiguous": self.contiguous,
            "steps": self.steps,
            "settings": self.settings,
            "seconds": self.seconds,
        }
        if self.gains is not None:
            d["correction_gains"] = self.gains
        if include_analysis and self.analysis is not None:
            d["analysis"] = self.analysis.to_dict()
        return d

    def to_json(self, path=None, indent: int | None = 1, include_analysis: bool = False) -> str:
        """The full search report as JSON (``plan.to_json()`` is the plan alone)."""
        from .report import json_text

        return json_text(self.to_dict(include_analysis), path, indent)


def contiguous_plans(num_layers: int, num_groups: int, parallel: int, bypass: int = 0, exclude=()) -> list[CQILPlan]:
    """Every window ``CQILPlan.contiguous(s, s + num_groups*parallel, parallel)`` that fits the
    model and touches no excluded layer, by start ``s``."""
    span = num_groups * parallel
    excluded = set(int(e) for e in exclude)
    out = []
    for start in range(0, num_layers - span + 1):
        if excluded.intersection(range(start, start + span)):
            continue
        out.append(CQILPlan.contiguous(start, start + span, parallel, bypass=bypass))
    return out


def _check_int(name: str, value, minimum: int | None = None, allow_none: bool = False):
    """Ints only (2.5 groups or True beams are bugs, not requests); None where allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
        except ImportError:  # pragma: no cover
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_arguments(groups, budget, budget_metric, rank_metric, beam, swap_rounds, swap_candidates,
                     contiguous_top, batch_size, parallel, bypass, seed) -> None:
    """Every argument of ``search``, before any work."""
    _check_int("groups", groups, 1, allow_none=True)
    if groups is None and budget is None:
        raise ValueError("give the number of groups, a quality budget, or both")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget != budget:
            raise TypeError(f"budget must be a number, got {budget!r}")
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
    for name, value in (("budget_metric", budget_metric), ("rank_metric", rank_metric)):
        if value not in METRICS:
            raise ValueError(f"{name} must be one of {METRICS}, got {value!r}")
    _check_int("beam", beam, 1)
    _check_int("swap_rounds", swap_rounds, 0)
    _check_int("swap_candidates", swap_candidates, 1)
    _check_int("contiguous_top", contiguous_top, 0, allow_none=True)
    _check_int("batch_size", batch_size, 1)
    _check_int("parallel", parallel, 2)
    _check_int("bypass", bypass, 0)
    _check_int("seed", seed)


class _Measurer:
    """Measures plans on the calibration windows: plain CQIL, or after the correction."""

    def __init__(self, model, windows, batch_size, progress, backend, corrected, calibrate_options):
        self.model, self.windows = model, windows
        self.batch_size, self.progress, self.backend = batch_size, progress, backend
        self.corrected = corrected
        self.options = dict(calibrate_options or {})

    def __call__(self, plans: list[CQILPlan], desc: str) -> tuple[EvalResult, list[EvalResult], list[CQILPlan]]:
        """(base, results, measured plans): a corrected plan comes back with its chosen bypass."""
        if not self.corrected:
            base, results = compare_plans(self.model, self.windows, plans, batch_size=self.batch_size,
                                          progress=self.progress, backend=self.backend, desc=desc)
            return base, results, plans
        from .calibrate import calibrate

        base, results, measured = None, [], []
        for plan in plans:
            res = calibrate(self.model, plan, self.windows, keep_original=True, batch_size=self.batch_size,
                            backend=self.backend, progress=False, **self.options)
            try:
                with res.sequential_original(self.model):
                    base, (r,) = compare_plans(self.model, self.windows, [res.plan], batch_size=self.batch_size,
                                               progress=self.progress, backend=self.backend, desc=desc)
            finally:
                res.restore(self.model)
            r.extra["calibration"] = [g.to_dict() for g in res.groups]
            results.append(r)
            measured.append(res.plan)
        return base, results, measured


def _corrected_costs(model, windows, analysis, candidates, batch_size, progress, options) -> tuple[dict, dict]:
    """Predicted cost of every single candidate after correction: its measured uncorrected cost
    times the factor by which the correction shrinks its held-back output error."""
    from .calibrate import correction_gains

    opts = {k: v for k, v in (options or {}).items() if k not in ("refit", "keep_maps", "keep_original")}
    gains = correction_gains(model, windows, [c.group for c in candidates], batch_size=batch_size,
                             progress=progress, plan_bypass=analysis.bypass, **opts)
    predicted, report = {}, {}
    for c in candidates:
        g = gains[c.group]
        plain = next((x.get("plain_error") for x in g.candidates if x["bypass"] == analysis.bypass), None)
        best = g.corrected_error if g.corrected else g.plain_error
        factor = best / plain if plain and best is not None else 1.0
        predicted[c.group] = (c.kl * factor, c.ppl_increase * factor)
        report["-".join(map(str, c.group))] = {"factor": factor, "bypass": g.bypass, "plain_error": plain,
                                                "corrected_error": g.corrected_error}
    return predicted, report


def search(
    model,
    windows,
    parallel: int = 2,
    groups: int | None = None,
    budget: float | None = None,
    *,
    budget_metric: str = "ppl",
    rank_metric: str = "kl",
    exclude=(),
    bypass: int = 0,
    seed: int = 0,
    beam: int = 4,
    swap_rounds: int = 0,
    swap_candidates: int = 3,
    contiguous_top: int | None = 4,
    analysis: LayerAnalysis | None = None,
    batch_size: int = 2,
    progress: bool = True,
    backend: str = "auto",
    corrected: bool = False,
    calibrate_options: dict | None = None,
) -> SearchResult:
    """Choose disjoint groups of ``parallel`` adjacent layers by their measured cost.

    Args:
        model: a HF causal LM (state restored at the end).
        windows: calibration ``TokenWindows`` [W, T].
        parallel: layers per group P.
        groups: number of groups N wanted (an int). With ``budget`` too: at most N.
        budget: quality budget on the calibration text: the largest relative perplexity
            increase (``budget_metric="ppl"``, 0.10 = +10%) or mean KL in nats (``"kl"``) the whole
            plan may have. Without ``groups``: as many groups as fit.
        rank_metric: what "cheapest" means when choosing: ``"kl"`` (KL(base || converted), smooth,
            default) or ``"ppl"`` (relative perplexity increase). Reports name it
            (``result.rank_metric``).
        exclude: layers no group may touch.
        bypass: bypass distance d of the plan (candidates are measured with it; with
            ``corrected=True`` only the uncorrected analysis uses it: the correction chooses d
            per group by measurement, unless ``calibrate_options={"bypass": "plan"}``).
        seed: breaks ties between equal costs; the search is deterministic for a seed.
        beam: candidates measured jointly at each greedy step (>= 1).
        swap_rounds: passes (>= 0) of "replace one chosen group by an unused candidate" after the
            greedy phase (each costs up to N * swap_candidates measurements).
        contiguous_top: how many contiguous windows (>= 0) to measure for comparison, cheapest
            predicted first (None: all; 0: none).
        analysis: a LayerAnalysis to reuse (same P and bypass); computed when None.
        corrected: rank by the cost after ``calibrate``'s correction (see the module docstring);
            each measured combination then costs a calibration and a forward more.
        calibrate_options: keyword arguments for ``calibrate`` (map, target, fold, bypass, ...).

    Returns:
        SearchResult; ``.plan`` is the CQILPlan (with ``corrected=True``: with the bypass per
        group the correction chose; the weights are restored, run ``calibrate`` to apply it).

    Raises:
        TypeError / ValueError: a bad argument (checked before any work: e.g. ``groups=2.5``,
        ``swap_rounds=-1``); neither ``groups`` nor ``budget`` given; fewer than ``groups``
        disjoint candidates exist (without a budget).

    Example:
        >>> res = search(model, calib_windows, parallel=2, groups=4)   # doctest: +SKIP
        >>> res.plan.to_json("plan.json")                              # doctest: +SKIP
    """
    t0 = time.perf_counter()
    _check_arguments(groups, budget, budget_metric, rank_metric, beam, swap_rounds, swap_candidates,
                     contiguous_top, batch_size, parallel, bypass, seed)
    if calibrate_options is not None and not isinstance(calibrate_options, dict):
        raise TypeError(f"calibrate_options must be a dict of calibrate() keyword arguments, got {calibrate_options!r}")
    bad = set(calibrate_options or {}) & {"keep_original", "backend", "progress", "batch_size"}
    if bad:
        raise ValueError(f"calibrate_options may not set {sorted(bad)}: search sets them")
    num_layers = len(decoder_layers(model))
    exclude = sorted({int(e) for e in exclude})
    if any(not 0 <= e < num_layers for e in exclude):
        raise ValueError(f"exclude {exclude} names layers outside 0..{num_layers - 1}")
    CQILPlan([list(range(parallel))], bypass=bypass)  # validates parallel / bypass early
    if parallel > num_layers:
        raise ValueError(f"parallel={parallel} exceeds the model's {num_layers} layers")

    if analysis is None:
        analysis = analyze(
            model, windows, parallel, bypass=bypass, exclude=exclude, batch_size=batch_size, progress=progress,
            backend=backend,
        )
    elif analysis.parallel != parallel or analysis.bypass != bypass or analysis.num_layers != num_layers:
        raise ValueError(
            f"the analysis measured groups of {analysis.parallel} (bypass {analysis.bypass}) on "
            f"{analysis.num_layers} layers; this search wants {parallel} (bypass {bypass}) on {num_layers}"
        )

    # Candidates cheapest first; equal costs in a seeded random order so that ties do not
    # always favour low layer indices.
    rng = random.Random(seed)
    tiebreak = {c.group: rng.random() for c in analysis.costs}
    excluded = set(exclude)
    pool = [c for c in analysis.costs if not excluded.intersection(c.group)]
    single = {c.group: (c.kl, c.ppl_increase) for c in pool}
    gains = None
    if corrected:
        single, gains = _corrected_costs(model, windows, analysis, pool, batch_size, progress, calibrate_options)
    rank_index = 0 if rank_metric == "kl" else 1
    candidates = sorted(pool, key=lambda c: (single[c.group][rank_index], tiebreak[c.group]))
    measure_plans = _Measurer(model, windows, batch_size, progress, backend, corrected, calibrate_options)

    def predicted(chosen) -> tuple[float, float]:
        return sum(single[g][0] for g in chosen), sum(single[g][1] for g in chosen)

    def make_plan(chosen) -> CQILPlan:
        return CQILPlan(sorted(list(g) for g in chosen), bypass=bypass if chosen else 0)

    def fits(result: EvalResult) -> bool:
        return budget is None or _metric(result, budget_metric) <= budget

    steps: list[dict] = []
    base_ppl = analysis.base_perplexity
    measured_plan: dict = {}  # tuple of groups -> the plan as measured (corrected: its chosen bypass)

    def measure(options: list[list[tuple]], step: str) -> list[EvalResult]:
        nonlocal base_ppl
        plans = [make_plan(c) for c in options]
        base, results, used = measure_plans(plans, f"search {step}: {len(plans)} plans")
        base_ppl = base.perplexity
        for option, plan, r in zip(options, used, results):
            measured_plan[tuple(sorted(option))] = plan
            steps.append({"step": step, **_summary(plan, r, *predicted(option)), "accepted": False})
        return results

    def capacity(taken) -> int:
        """How many more disjoint groups fit in the layers not taken or excluded."""
        used = excluded.union(*map(set, taken)) if taken else set(excluded)
        total, run = 0, 0
        for layer in range(num_layers + 1):
            if layer < num_layers and layer not in used:
                run += 1
            else:
                total, run = total + run // parallel, 0
        return total

    if groups is not None and budget is None and capacity([]) < groups:
        raise ValueError(
            f"only {capacity([])} disjoint groups of {parallel} layers fit this model "
            f"({num_layers} layers, excluded {exclude}); asked for {groups}"
        )

    chosen: list[tuple] = []
    chosen_result: EvalResult | None = None
    while groups is None or len(chosen) < groups:
        free = [c.group for c in candidates if not any(set(c.group) & set(g) for g in chosen)]
        if groups is not None:
            # Keep N reachable: a cheap group in the wrong place can leave too little room.
            need = groups - len(chosen) - 1
            free = [g for g in free if capacity(chosen + [g]) >= need]
        if not free:
            break
        options = [chosen + [g] for g in free[:beam]]
        results = measure(options, f"add {len(chosen) + 1}")
        ok = [(i, r) for i, r in enumerate(results) if fits(r)]
        if not ok:
            break  # no affordable addition: the budget is reached
        i, r = min(ok, key=lambda ir: (_metric(ir[1], rank_metric), ir[0]))
        steps[len(steps) - len(results) + i]["accepted"] = True
        chosen, chosen_result = options[i], r

    for round_ in range(swap_rounds if len(chosen) > 0 else 0):
        improved = False
        for k in range(len(chosen)):
            rest = chosen[:k] + chosen[k + 1 :]
            free = [c.group for c in candidates if c.group not in chosen and not any(set(c.group) & set(g) for g in rest)]
            options = [rest + [g] for g in free[:swap_candidates]]
            if not options:
                continue
            results = measure(options, f"swap {round_ + 1}.{k + 1}")
            best = min(range(len(results)), key=lambda j: _metric(results[j], rank_metric))
            if fits(results[best]) and _metric(results[best], rank_metric) < _metric(chosen_result, rank_metric):
                steps[len(steps) - len(results) + best]["accepted"] = True
                chosen, chosen_result, improved = options[best], results[best], True
        if not improved:
            break

    plan = measured_plan.get(tuple(sorted(chosen)), make_plan(chosen)) if chosen else make_plan(chosen)
    calib = _summary(plan, chosen_result, *predicted(chosen)) if chosen_result is not None else {
        "groups": [], "bypass": 0, "perplexity": base_ppl, "ppl_increase": 0.0, "kl": 0.0,
        "top1_agreement": 1.0, "predicted_kl": 0.0, "predicted_ppl_increase": 0.0,
    }
    calib["ranked_by"] = rank_metric
    calib["corrected"] = bool(corrected)

    contiguous, best_contiguous = _measure_contiguous(
        chosen, num_layers, parallel, bypass, exclude, single, predicted, rank_metric, contiguous_top, measure_plans,
    )

    settings = {
        "parallel": parallel, "groups": groups, "budget": budget, "budget_metric": budget_metric,
        "rank_metric": rank_metric, "exclude": exclude, "bypass": bypass, "seed": seed, "beam": beam,
        "swap_rounds": swap_rounds, "swap_candidates": swap_candidates, "contiguous_top": contiguous_top,
        "corrected": bool(corrected), "calibrate_options": dict(calibrate_options or {}),
        "text": windows.to_dict(),
    }
    return SearchResult(
        plan=plan, calib=calib, steps=steps, contiguous=contiguous, best_contiguous=best_contiguous,
        analysis=analysis, settings=settings, base_perplexity=base_ppl, seconds=time.perf_counter() - t0,
        gains=gains,
    )


def _measure_contiguous(chosen, num_layers, parallel, bypass, exclude, single, predicted, rank_metric,
                        contiguous_top, measure_plans) -> tuple[list, dict | None]:
    """The paper's contiguous windows with as many groups as ``chosen``, measured the same way."""
    contiguous, best_contiguous = [], None
    if not chosen:
        return contiguous, best_contiguous
    windows_plans = contiguous_plans(num_layers, len(chosen), parallel, bypass, exclude)
    scored = []
    for p in windows_plans:
        if all(tuple(g) in single for g in p.groups):
            pk, pp = predicted([tuple(g) for g in p.groups])
            scored.append((pk if rank_metric == "kl" else pp, p, pk, pp))
    scored.sort(key=lambda s: s[0])
    n_measure = len(scored) if contiguous_top is None else min(contiguous_top, len(scored))
    results, used = [], []
    if n_measure:
        _, results, used = measure_plans([s[1] for s in scored[:n_measure]], f"contiguous: {n_measure} plans")
    for idx, (_, p, pk, pp) in enumerate(scored):
        if idx < n_measure:
            entry = _summary(used[idx], results[idx], pk, pp)
        else:
            entry = {"groups": [list(g) for g in p.groups], "bypass": bypass, "predicted_kl": pk,
                     "predicted_ppl_increase": pp}
        entry["start"], entry["end"] = p.groups[0][0], p.groups[-1][-1] + 1
        contiguous.append(entry)
    measured = [c for c in contiguous if "kl" in c]
    if measured:
        best_contiguous = min(measured, key=lambda c: c["kl"] if rank_metric == "kl" else c["ppl_increase"])
    return contiguous, best_contiguous
