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
"""

from __future__ import annotations

import json
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
        "bypass": plan.bypass,
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
        if include_analysis and self.analysis is not None:
            d["analysis"] = self.analysis.to_dict()
        return d

    def to_json(self, path=None, indent: int | None = 1, include_analysis: bool = False) -> str:
        """The full search report as JSON (``plan.to_json()`` is the plan alone)."""
        text = json.dumps(self.to_dict(include_analysis), indent=indent)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text


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
) -> SearchResult:
    """Choose disjoint groups of ``parallel`` adjacent layers by their measured cost.

    Args:
        model: a HF causal LM (state restored at the end).
        windows: calibration ``TokenWindows`` [W, T].
        parallel: layers per group P.
        groups: number of groups N wanted. With ``budget`` too: at most N.
        budget: quality budget on the calibration text: the largest relative perplexity
            increase (``budget_metric="ppl"``, 0.10 = +10%) or mean KL in nats (``"kl"``) the whole
            plan may have. Without ``groups``: as many groups as fit.
        rank_metric: what "cheapest" means when choosing: ``"kl"`` (smooth, default) or ``"ppl"``.
        exclude: layers no group may touch.
        bypass: bypass distance d of the plan (candidates are measured with it).
        seed: breaks ties between equal costs; the search is deterministic for a seed.
        beam: candidates measured jointly at each greedy step.
        swap_rounds: passes of "replace one chosen group by an unused candidate" after the greedy
            phase (each costs up to N * swap_candidates measurements).
        contiguous_top: how many contiguous windows to measure for comparison, cheapest predicted
            first (None: all; 0: none).
        analysis: a LayerAnalysis to reuse (same P and bypass); computed when None.

    Returns:
        SearchResult; ``.plan`` is the CQILPlan.

    Raises:
        ValueError: neither ``groups`` nor ``budget`` given, or fewer than ``groups`` disjoint
            candidates exist (without a budget).

    Example:
        >>> res = search(model, calib_windows, parallel=2, groups=4)   # doctest: +SKIP
        >>> res.plan.to_json("plan.json")                              # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if groups is None and budget is None:
        raise ValueError("give the number of groups, a quality budget, or both")
    if groups is not None and groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if budget is not None and budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    for name, value in (("budget_metric", budget_metric), ("rank_metric", rank_metric)):
        if value not in METRICS:
            raise ValueError(f"{name} must be one of {METRICS}, got {value!r}")
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    num_layers = len(decoder_layers(model))
    exclude = sorted({int(e) for e in exclude})
    if any(not 0 <= e < num_layers for e in exclude):
        raise ValueError(f"exclude {exclude} names layers outside 0..{num_layers - 1}")
    CQILPlan([list(range(parallel))], bypass=bypass)  # validates parallel / bypass early

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
    candidates = sorted(
        (c for c in analysis.costs if not excluded.intersection(c.group)),
        key=lambda c: (c.metric(rank_metric), tiebreak[c.group]),
    )
    single = {c.group: c for c in candidates}

    def predicted(chosen) -> tuple[float, float]:
        return sum(single[g].kl for g in chosen), sum(single[g].ppl_increase for g in chosen)

    def make_plan(chosen) -> CQILPlan:
        return CQILPlan(sorted(list(g) for g in chosen), bypass=bypass)

    def fits(result: EvalResult) -> bool:
        return budget is None or _metric(result, budget_metric) <= budget

    steps: list[dict] = []
    base_ppl = analysis.base_perplexity

    def measure(options: list[list[tuple]], step: str) -> list[EvalResult]:
        nonlocal base_ppl
        plans = [make_plan(c) for c in options]
        base, results = compare_plans(
            model, windows, plans, batch_size=batch_size, progress=progress, backend=backend,
            desc=f"search {step}: {len(plans)} plans",
        )
        base_ppl = base.perplexity
        for option, plan, r in zip(options, plans, results):
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

    plan = make_plan(chosen)
    calib = _summary(plan, chosen_result, *predicted(chosen)) if chosen_result is not None else {
        "groups": [], "bypass": bypass, "perplexity": base_ppl, "ppl_increase": 0.0, "kl": 0.0,
        "top1_agreement": 1.0, "predicted_kl": 0.0, "predicted_ppl_increase": 0.0,
    }

    # The paper's contiguous windows with as many groups, measured the same way.
    contiguous, best_contiguous = [], None
    if chosen:
        windows_plans = contiguous_plans(num_layers, len(chosen), parallel, bypass, exclude)
        scored = []
        for p in windows_plans:
            if all(tuple(g) in single for g in p.groups):
                pk, pp = predicted([tuple(g) for g in p.groups])
                scored.append((pk if rank_metric == "kl" else pp, p, pk, pp))
        scored.sort(key=lambda s: s[0])
        n_measure = len(scored) if contiguous_top is None else min(contiguous_top, len(scored))
        if n_measure:
            _, results = compare_plans(
                model, windows, [s[1] for s in scored[:n_measure]], batch_size=batch_size, progress=progress,
                backend=backend, desc=f"contiguous: {n_measure} plans",
            )
        else:
            results = []
        for idx, (_, p, pk, pp) in enumerate(scored):
            if idx < n_measure:
                entry = _summary(p, results[idx], pk, pp)
            else:
                entry = {"groups": [list(g) for g in p.groups], "bypass": bypass, "predicted_kl": pk,
                         "predicted_ppl_increase": pp}
            entry["start"], entry["end"] = p.groups[0][0], p.groups[-1][-1] + 1
            contiguous.append(entry)
        measured = [c for c in contiguous if "kl" in c]
        if measured:
            best_contiguous = min(measured, key=lambda c: c["kl"] if rank_metric == "kl" else c["ppl_increase"])

    settings = {
        "parallel": parallel, "groups": groups, "budget": budget, "budget_metric": budget_metric,
        "rank_metric": rank_metric, "exclude": exclude, "bypass": bypass, "seed": seed, "beam": beam,
        "swap_rounds": swap_rounds, "swap_candidates": swap_candidates, "contiguous_top": contiguous_top,
        "text": windows.to_dict(),
    }
    return SearchResult(
        plan=plan, calib=calib, steps=steps, contiguous=contiguous, best_contiguous=best_contiguous,
        analysis=analysis, settings=settings, base_perplexity=base_ppl, seconds=time.perf_counter() - t0,
    )
