"""Single-node latency tuning: which plan is fastest on this machine within a quality budget.

``tune`` joins what the other steps measure apart. For a model it

1. gathers candidate plans (:func:`candidate_plans`): no groups; the plans ``search`` finds for
   N = 1..k groups at each P (the greedy search's accepted step n *is* its best n-group plan, so
   one search per P gives every N); the best contiguous window it measured and the paper's S/E/P
   plan (:func:`paper_plan`); any plans the user gives;
2. takes their quality on calibration text - perplexity change, KL, top-1 agreement - from a
   :class:`QualityCache` keyed by plan, filled with what ``search`` already measured and, for the
   rest, by one ``compare_plans`` run (one base forward per batch for all of them): no plan is
   measured twice;
3. times each plan through ``DecodeEngine`` (:func:`measure_latency`): decode ms per step at every
   requested batch size and context length (CUDA graph on a GPU, eager on the CPU; an untimed
   warm-up repeat first, then several repeats: median and spread) and prefill ms of a prompt;
4. optionally models the step on W devices (:func:`modeled_column`), from one-device segment times
   measured here (:func:`measure_segment_costs`) and an assumed all-reduce latency, with
   ``cqil_kernels.distributed.latency_model``;
5. builds the Pareto set of latency vs quality (:func:`pareto_front`) and recommends the fastest
   plan within the quality budget (:func:`recommend`).

:class:`TuneResult` prints the table (saying what was measured on which device; CPU latencies are
labelled as such), plots it (PNG) and writes ``tune.json`` and ``plan.json``.

Example:
    >>> res = cqil_kernels.tune(model, windows, parallel=(2,), max_groups=2, budget_ppl=0.10)  # doctest: +SKIP
    >>> print(res.table()); res.write("reports/tune")                               # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .conversion import decoder_layers
from .latency import LatencySettings, measure_latency  # noqa: F401  (LatencySettings re-exported)
from .plan import CQILPlan

__all__ = [
    "Candidate", "QualityCache", "LatencySettings", "TuneResult", "tune", "candidate_plans", "search_candidates",
    "paper_plan", "measure_latency", "measure_segment_costs", "modeled_column", "pareto_front", "recommend",
    "plan_key",
]

QUALITY_METRICS = {"ppl": "ppl_increase", "kl": "kl"}
DEFAULT_BUDGET_PPL = 0.10
DEFAULT_ALLREDUCE_US = 20.0  # NCCL small-message all-reduce on H100 NVLink (design.md section 4: 19-23 us)

# The paper's S/E/P plans (reference code: LLaMA-1-7B S12-E30 P2, S14-E30 P4), by depth; other
# depths scale the 32-layer window (benchmarks/decode_models.py uses the same rule).
PAPER_PLANS = {32: {2: (12, 30), 4: (14, 30)}, 30: {2: (14, 30), 4: (14, 30)}}


# ---------------------------------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class Candidate:
    """A plan to measure: ``name`` (unique in a run), the plan, and where it came from."""

    name: str
    plan: CQILPlan
    source: str


def plan_key(plan: CQILPlan | None) -> str:
    """Canonical key of a plan's computation: its parallel groups and bypass (an empty plan is
    the sequential model whatever its bypass)."""
    if plan is None or not plan.parallel_groups:
        return json.dumps({"groups": [], "bypass": 0})
    return json.dumps({"groups": [list(g) for g in plan.parallel_groups], "bypass": plan.bypass})


def _groups_str(plan: CQILPlan) -> str:
    return " ".join(f"{g[0]}-{g[-1]}" for g in plan.parallel_groups) or "(none)"


def paper_plan_range(num_layers: int, parallel: int) -> tuple[int, int]:
    """(S, E) of the paper-style plan: 32 layers S12-E30 (P2) / S14-E30 (P4), 30 layers S14-E30;
    other depths scale the 32-layer window by ``num_layers / 32``."""
    if num_layers in PAPER_PLANS and parallel in PAPER_PLANS[num_layers]:
        return PAPER_PLANS[num_layers][parallel]
    s32, e32 = PAPER_PLANS[32].get(parallel, (14, 30))
    return round(num_layers * s32 / 32), min(num_layers, round(num_layers * e32 / 32))


def paper_plan(num_layers: int, parallel: int) -> Candidate | None:
    """The paper's contiguous S/E/P plan for this depth and P (None if no group fits)."""
    start, end = paper_plan_range(num_layers, parallel)
    plan = CQILPlan.contiguous(start, end, parallel)
    if not plan.parallel_groups:
        return None
    return Candidate(f"paper S{start}-E{end} P{parallel}", plan, "paper (contiguous S/E/P)")


def search_candidates(result, num_layers: int) -> list[Candidate]:
    """Plans a ``SearchResult`` measured: its best plan of every size N = 1..k (the accepted greedy
    steps, the final plan for N = k) and its best contiguous window."""
    P = result.settings.get("parallel")
    bypass = result.plan.bypass
    by_size: dict[int, CQILPlan] = {}
    for step in result.steps:
        if step.get("accepted") and str(step.get("step", "")).startswith("add"):
            plan = CQILPlan(step["groups"], bypass=step.get("bypass", bypass))
            by_size[len(plan.parallel_groups)] = plan
    if result.plan.parallel_groups:
        by_size[len(result.plan.parallel_groups)] = result.plan
    out = [Candidate(f"search P{P} N{n}", plan, f"search (P={P})") for n, plan in sorted(by_size.items())]
    best = result.best_contiguous
    if best:
        plan = CQILPlan(best["groups"], bypass=best.get("bypass", bypass))
        out.append(Candidate(f"contiguous P{P} N{len(plan.parallel_groups)} S{best['start']}-E{best['end']}", plan,
                             "search's best contiguous window"))
    return out


def _dedupe(candidates: Sequence[Candidate]) -> list[Candidate]:
    """One candidate per computation; a plan found twice keeps both names ("a = b")."""
    index: dict[str, int] = {}
    out: list[Candidate] = []
    for c in candidates:
        key = plan_key(c.plan)
        if key not in index:
            index[key] = len(out)
            out.append(c)
        else:
            first = out[index[key]]
            out[index[key]] = Candidate(f"{first.name} = {c.name}", first.plan, f"{first.source}; {c.source}")
    return out


# ---------------------------------------------------------------------------------------------- quality
class QualityCache:
    """Quality of plans on one calibration text, keyed by :func:`plan_key`: measured once.

    Entries: ``{"ppl_increase", "kl", "top1_agreement", "perplexity", "source"}``.
    """

    def __init__(self, text: dict | None = None):
        self.text = text
        self._entries: dict[str, dict] = {plan_key(None): {"ppl_increase": 0.0, "kl": 0.0, "top1_agreement": 1.0,
                                                            "perplexity": None, "source": "the sequential model"}}
        self.measured_here = 0

    def __contains__(self, plan) -> bool:
        return plan_key(plan) in self._entries

    def get(self, plan) -> dict:
        return self._entries[plan_key(plan)]

    def put(self, plan, entry: dict) -> None:
        self._entries.setdefault(plan_key(plan), entry)

    def add_search(self, result) -> None:
        """Every plan ``search`` measured: the single groups of its analysis, its steps, its final
        plan and the contiguous windows it measured."""
        src = f"search (P={result.settings.get('parallel')})"
        if result.base_perplexity is not None:
            self._entries[plan_key(None)]["perplexity"] = result.base_perplexity
        analysis = result.analysis
        if analysis is not None:
            for c in analysis.costs:
                self.put(CQILPlan([list(c.group)], bypass=analysis.bypass),
                         {"ppl_increase": c.ppl_increase, "kl": c.kl, "top1_agreement": c.top1_agreement,
                          "perplexity": c.perplexity, "source": f"{src}: analyze"})
        records = list(result.steps) + [result.calib] + [c for c in result.contiguous if "kl" in c]
        for r in records:
            if r.get("kl") is None:
                continue
            plan = CQILPlan(r["groups"], bypass=r.get("bypass", 0))
            self.put(plan, {"ppl_increase": r["ppl_increase"], "kl": r["kl"], "top1_agreement": r["top1_agreement"],
                            "perplexity": r.get("perplexity"), "source": src})

    def missing(self, plans) -> list[CQILPlan]:
        out, keys = [], set()
        for p in plans:
            k = plan_key(p)
            if k not in self._entries and k not in keys:
                keys.add(k)
                out.append(p)
        return out

    def measure(self, model, windows, plans, *, batch_size: int = 2, progress: bool = True,
                backend: str = "auto") -> int:
        """Measure the plans not in the cache (one ``compare_plans`` run); returns how many."""
        from .evaluate import compare_plans

        todo = self.missing(plans)
        if not todo:
            return 0
        base, results = compare_plans(model, windows, todo, batch_size=batch_size, progress=progress,
                                      backend=backend, desc=f"tune quality: {len(todo)} plans")
        if self._entries[plan_key(None)]["perplexity"] is None:
            self._entries[plan_key(None)]["perplexity"] = base.perplexity
        for plan, r in zip(todo, results):
            self.put(plan, {"ppl_increase": r.ppl_increase, "kl": r.kl, "top1_agreement": r.top1_agreement,
                            "perplexity": r.perplexity, "source": "measured by tune"})
        self.measured_here += len(todo)
        return len(todo)


def _capacity(num_layers: int, parallel: int, exclude) -> int:
    """Disjoint groups of ``parallel`` adjacent layers that fit outside ``exclude``."""
    total = run = 0
    for layer in range(num_layers + 1):
        if layer < num_layers and layer not in exclude:
            run += 1
        else:
            total, run = total + run // parallel, 0
    return total


def candidate_plans(model, windows=None, *, parallel: Sequence[int] = (2, 3, 4), max_groups: int = 4,
                    plans: Sequence[Candidate] = (), run_search: bool = True, include_paper: bool = True,
                    quality: QualityCache | None = None, search_kwargs: dict | None = None,
                    progress: bool = True, backend: str = "auto") -> list[Candidate]:
    """No groups, ``search`` for N = 1..max_groups at each P (its measurements go into ``quality``),
    the paper's S/E/P plans, and ``plans``; one candidate per computation."""
    num_layers = len(decoder_layers(model))
    out = [Candidate("no groups", CQILPlan.sequential(), "baseline")]
    if run_search:
        if windows is None:
            raise ValueError("searching plans needs calibration windows")
        from .search import search

        exclude = set((search_kwargs or {}).get("exclude", ()))
        for P in parallel:
            n = min(max_groups, _capacity(num_layers, P, exclude))
            if n < 1:
                continue
            result = search(model, windows, parallel=P, groups=n, progress=progress, backend=backend,
                            **(search_kwargs or {}))
            if quality is not None:
                quality.add_search(result)
            out += search_candidates(result, num_layers)
    if include_paper:
        out += [c for c in (paper_plan(num_layers, P) for P in parallel) if c is not None]
    for c in plans:
        c.plan.validate_for(num_layers)
        out.append(c)
    return _dedupe(out)


# ---------------------------------------------------------------------------------------------- latency
# ---------------------------------------------------------------------------------------------- multi-GPU model
def _random_model_like(model, num_layers: int):
    """A random-weight model of ``model``'s family and widths with ``num_layers`` layers, on its
    device and dtype (latency does not depend on the weights' values)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:num_layers]
    for key in ("cqil",):
        if hasattr(cfg, key):
            delattr(cfg, key)
    p = next(model.parameters())
    torch.manual_seed(0)
    with torch.device(p.device):
        small = AutoModelForCausalLM.from_config(cfg, dtype=p.dtype, attn_implementation="sdpa")
    return small.eval()


def measure_segment_costs(model, settings: LatencySettings, sizes: Sequence[int]):
    """One-device segment times c_k (k in ``sizes``) and the embed/head time, at the primary decode
    setting, from random-weight models of the same shape: T(2 layers) and T(4 layers) give c_1 and
    t_embed_head; a model of k layers as one group gives c_k = T - t_embed_head."""
    from .distributed.latency_model import SegmentCosts

    def step_ms(layers: int, groups) -> float:
        small = _random_model_like(model, layers)
        plan = CQILPlan(groups) if groups else CQILPlan.sequential()
        ms = measure_latency(small, plan, one)["decode"][one.primary]["median_ms"]
        del small
        return ms

    one = LatencySettings(batch_sizes=settings.batch_sizes[:1], context_lengths=settings.context_lengths[:1],
                          prompt_len=1, decode_steps=settings.decode_steps, repeats=settings.repeats,
                          backend=settings.backend, cuda_graph=settings.cuda_graph,
                          launch_config=settings.launch_config, seed=settings.seed)
    t2, t4 = step_ms(2, []), step_ms(4, [])
    c = {1: (t4 - t2) / 2}
    t_eh = t2 - 2 * c[1]
    for k in sorted(set(sizes) - {1}):
        c[k] = step_ms(k, [list(range(k))]) - t_eh
    device = next(model.parameters()).device
    return SegmentCosts(c=c, t_embed_head=t_eh, source=(
        f"measured here on {device} ({one.primary}, median of {one.repeats} repeats of {one.decode_steps} steps): "
        f"random-weight models of this shape, T(2 layers) = {t2:.3f} ms, T(4 layers) = {t4:.3f} ms, "
        + ", ".join(f"c_{k} = {v:.3f} ms" for k, v in sorted(c.items()))))


def modeled_column(plan: CQILPlan, num_layers: int, world_size: int, costs, t_ar_ms: float) -> float | None:
    """Modeled ms/step of ``plan`` on ``world_size`` devices (None: a group cannot be split)."""
    from .distributed.latency_model import modeled_step

    if any(len(g) % world_size for g in plan.parallel_groups):
        return None
    groups = [list(g) for g in plan.parallel_groups]
    return modeled_step(num_layers, groups, world_size, costs, t_ar_ms)["ms"]


# ---------------------------------------------------------------------------------------------- selection
def _quality_of(row: dict, metric: str) -> float:
    return row["quality"][QUALITY_METRICS[metric]]


def _latency_of(row: dict, key: str) -> float:
    return row["latency"]["decode"][key]["median_ms"]


def pareto_front(rows: Sequence[dict], latency_key: str, metric: str = "ppl") -> list[str]:
    """Names of the rows no other row dominates (at most as slow and at most as costly, and better
    in one), fastest first."""
    front = []
    for a in rows:
        la, qa = _latency_of(a, latency_key), _quality_of(a, metric)
        dominated = any(
            _latency_of(b, latency_key) <= la and _quality_of(b, metric) <= qa
            and (_latency_of(b, latency_key) < la or _quality_of(b, metric) < qa)
            for b in rows if b is not a
        )
        if not dominated:
            front.append(a)
    return [r["name"] for r in sorted(front, key=lambda r: (_latency_of(r, latency_key), _quality_of(r, metric)))]


def recommend(rows: Sequence[dict], latency_key: str, metric: str, budget: float) -> dict:
    """The fastest row whose quality cost (``metric``: "ppl" relative perplexity change, "kl" nats)
    is within ``budget`` (ties: the better quality). The sequential model costs 0, so some row
    always fits a budget >= 0."""
    if metric not in QUALITY_METRICS:
        raise ValueError(f"budget metric must be one of {sorted(QUALITY_METRICS)}, got {metric!r}")
    if not budget >= 0:
        raise ValueError(f"the quality budget must be >= 0, got {budget}")
    fits = [r for r in rows if _quality_of(r, metric) <= budget]
    if not fits:
        raise ValueError(f"no candidate is within {metric} budget {budget} (include the 'no groups' plan)")
    return min(fits, key=lambda r: (_latency_of(r, latency_key), _quality_of(r, metric)))


# ---------------------------------------------------------------------------------------------- result
@dataclass
class TuneResult:
    """Rows (one per candidate), the Pareto set, the recommendation and where it was all measured."""

    rows: list
    settings: dict
    budget_metric: str
    budget: float
    latency_key: str
    pareto: list
    recommended: dict
    environment: dict
    device_label: str
    quality_text: dict | None = None
    world_size: int | None = None
    segment_costs: dict | None = None
    notes: list = field(default_factory=list)

    @property
    def plan(self) -> CQILPlan:
        return CQILPlan.from_dict(self.recommended["plan"])

    def to_dict(self) -> dict:
        return {
            "benchmark": "tune",
            "latency_measured_on": self.device_label,
            "quality": {"text": self.quality_text, "metrics": "calibration text: perplexity change, KL(base||plan), "
                        "top-1 agreement", "reused_from_search": sum(r["quality"]["source"].startswith("search")
                                                                       for r in self.rows)},
            "budget": {"metric": self.budget_metric, "value": self.budget},
            "primary_latency": self.latency_key,
            "settings": self.settings,
            "rows": self.rows,
            "pareto": self.pareto,
            "recommendation": {"name": self.recommended["name"], "plan": self.recommended["plan"],
                               "decode_ms": _latency_of(self.recommended, self.latency_key),
                               "quality": self.recommended["quality"]},
            "world_size": self.world_size,
            "segment_costs": self.segment_costs,
            "notes": self.notes,
            "environment": self.environment,
        }

    # ---- text
    def header(self) -> list[str]:
        lines = [f"latency: MEASURED on {self.device_label}"]
        q = self.quality_text
        src = f"{q.get('source')} ({q.get('windows')} windows x {q.get('seq_len')} tokens)" if q else "calibration text"
        lines.append(f"quality: calibration text {src}; measured once per plan (search's measurements reused)")
        if self.world_size:
            lines.append(f"modeled W={self.world_size}: MODELED, not measured on several devices (segment times "
                         f"measured here, all-reduce {self.settings.get('allreduce_us')} us assumed)")
        return lines

    def table(self) -> str:
        from .report import fmt, format_table

        s = self.settings
        dkeys = list(self.rows[0]["latency"]["decode"]) if self.rows else []
        pkeys = list(self.rows[0]["latency"]["prefill"]) if self.rows else []
        header = ["plan", "groups", "steps", "ppl %", "KL", "top-1"]
        header += [f"decode ms {k}" for k in dkeys] + [f"prefill ms {k}" for k in pkeys]
        if self.world_size:
            header.append(f"modeled W={self.world_size} ms")
        header.append("note")
        rows = []
        for r in self.rows:
            q = r["quality"]
            cells = [r["name"], r["groups"], r["steps"], q["ppl_increase"] * 100, q["kl"], q["top1_agreement"]]
            for k in dkeys:
                st = r["latency"]["decode"][k]
                cells.append(f"{fmt(st['median_ms'], 4)} ±{st['spread_pct'] / 2:.0f}%")
            for k in pkeys:
                cells.append(fmt(r["latency"]["prefill"][k]["median_ms"], 4))
            if self.world_size:
                cells.append(r.get("modeled_ms") if r.get("modeled_ms") is not None else "-")
            mark = ("pareto" if r["name"] in self.pareto else "")
            if r["name"] == self.recommended["name"]:
                mark = (mark + " <- recommended").strip()
            cells.append(mark)
            rows.append(cells)
        budget = (f"{self.budget:+.1%} perplexity" if self.budget_metric == "ppl" else f"{self.budget} nats KL")
        foot = (f"recommended: {self.recommended['name']} (fastest at {self.latency_key} within {budget}); "
                f"±: half the min-max spread of {s.get('repeats')} repeats")
        return "\n".join(self.header() + [format_table(header, rows), foot])

    # ---- files
    def plot(self, path) -> Path:
        """PNG: decode ms (primary setting, min-max bars) against the quality cost, Pareto front,
        recommendation and budget."""
        from .report import _figure

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = _figure(8.5, 5.5)
        ax = fig.add_subplot(1, 1, 1)
        scale = 100.0 if self.budget_metric == "ppl" else 1.0
        for r in self.rows:
            st = r["latency"]["decode"][self.latency_key]
            y = _quality_of(r, self.budget_metric) * scale
            on_front = r["name"] in self.pareto
            ax.errorbar(st["median_ms"], y, xerr=[[st["median_ms"] - st["min_ms"]], [st["max_ms"] - st["median_ms"]]],
                        fmt="o", color="tab:blue" if on_front else "tab:gray", capsize=2)
            ax.annotate(r["name"], (st["median_ms"], y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        front = [r for name in self.pareto for r in self.rows if r["name"] == name]
        ax.step([_latency_of(r, self.latency_key) for r in front],
                [_quality_of(r, self.budget_metric) * scale for r in front], where="post", color="tab:blue",
                linewidth=1, label="Pareto front")
        rec = self.recommended
        ax.plot([_latency_of(rec, self.latency_key)], [_quality_of(rec, self.budget_metric) * scale], marker="*",
                markersize=16, color="tab:red", linestyle="none", label=f"recommended: {rec['name']}")
        ax.axhline(self.budget * scale, color="tab:red", linestyle="--", linewidth=0.8, label="quality budget")
        linthresh = 1.0 if self.budget_metric == "ppl" else 1e-2
        ax.set_yscale("symlog", linthresh=linthresh)
        # costs are >= 0 (a plan's perplexity can drop a little: keep that visible); headroom above
        # the worst plan so its marker and label are not cut by the frame
        ys = [_quality_of(r, self.budget_metric) * scale for r in self.rows] + [self.budget * scale]
        ax.set_ylim(min(0.0, min(ys) * 1.5), max(max(ys), linthresh) * 3)
        ax.set_xlabel(f"decode ms/step at {self.latency_key} (median; bars: min-max of the repeats)")
        ax.set_ylabel("perplexity change (%)" if self.budget_metric == "ppl" else "KL (nats/token)")
        label = "\n".join(textwrap.wrap(f"latency measured on {self.device_label}", 110))
        ax.set_title(f"CQIL plans: latency vs quality (calibration text)\n{label}", fontsize=8)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(path)
        return path

    def write(self, out_dir, plan_name: str = "plan.json") -> dict:
        """``tune.json``, ``tune.png`` and the recommended plan (``plan_name``) into ``out_dir``."""
        from .report import write_json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": write_json(self.to_dict(), out / "tune.json"), "png": self.plot(out / "tune.png")}
        self.plan.to_json(out / plan_name)
        paths["plan"] = out / plan_name
        return paths


# ---------------------------------------------------------------------------------------------- the whole step
def device_label(device, cuda_graph: bool | None, backend: str | None) -> str:
    """What the latencies are: the device, how the engine ran, and for the CPU that they are CPU numbers."""
    from .report import environment

    device = torch.device(device)
    env = environment(str(device))
    mode = "CUDA graph" if cuda_graph else "eager"
    if device.type == "cuda":
        return f"{env['device']} (DecodeEngine, {mode}, backend {backend})"
    return (f"CPU ({env['cpu']}, {torch.get_num_threads()} torch threads; DecodeEngine {mode}, backend {backend}) - "
            "CPU latencies, not GPU numbers")


def _check_budget(budget_ppl, budget_kl) -> tuple[str, float]:
    if budget_ppl is not None and budget_kl is not None:
        raise ValueError("give one quality budget: budget_ppl or budget_kl, not both")
    if budget_kl is not None:
        metric, value = "kl", budget_kl
    else:
        metric, value = "ppl", DEFAULT_BUDGET_PPL if budget_ppl is None else budget_ppl
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"the quality budget must be a number >= 0, got {value!r}")
    return metric, float(value)


def _check_world_size(world_size):
    if world_size is None:
        return None
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 2:
        raise ValueError(f"world_size must be an integer >= 2 (the modeled devices), got {world_size!r}")
    return world_size


def measure_candidates(model, candidates: Sequence[Candidate], quality: QualityCache, settings: LatencySettings,
                       progress: bool = True) -> list[dict]:
    """One row per candidate: its quality from ``quality`` and its latency measured now."""
    from tqdm.auto import tqdm

    num_layers = len(decoder_layers(model))
    rows = []
    for c in tqdm(candidates, desc="tune latency", unit="plan", disable=not progress, leave=False):
        q = dict(quality.get(c.plan))
        rows.append({"name": c.name, "source": c.source, "plan": c.plan.to_dict(), "groups": _groups_str(c.plan),
                     "steps": c.plan.num_sequential_steps(num_layers), "quality": q,
                     "latency": measure_latency(model, c.plan, settings)})
    return rows


def tune(model, windows=None, *, parallel: Sequence[int] = (2, 3, 4), max_groups: int = 4,
         plans: Sequence[CQILPlan | Candidate] = (), run_search: bool = True, include_paper: bool = True,
         quality: QualityCache | None = None, candidates: Sequence[Candidate] | None = None,
         budget_ppl: float | None = None, budget_kl: float | None = None,
         batch_sizes: Sequence[int] = (1,), context_lengths: Sequence[int] = (128,), prompt_len: int = 128,
         decode_steps: int = 16, repeats: int = 5, world_size: int | None = None,
         allreduce_us: float = DEFAULT_ALLREDUCE_US, backend: str = "auto", launch_config=None,
         search_kwargs: dict | None = None, batch_size: int = 2, progress: bool = True) -> TuneResult:
    """Measure candidate plans for latency on this machine and quality on ``windows``; recommend one.

    Args:
        model: a HF causal LM (sequential; its state is restored at the end).
        windows: calibration ``TokenWindows`` (needed unless every candidate's quality is in
            ``quality``).
        parallel, max_groups: ``search`` runs at each P for N = max_groups groups (which also gives
            its best plans of 1..N groups); ``run_search=False`` skips it.
        plans: extra plans (CQILPlan or Candidate, e.g. read from the user's plan files).
        include_paper: also the paper's S/E/P plan at each P.
        quality: a QualityCache to use and fill (e.g. with an earlier search's measurements).
        candidates: use exactly these (no search, no paper plans; ``plans`` still added).
        budget_ppl / budget_kl: the quality budget of the recommendation (relative perplexity
            change, default 0.10; or KL in nats).
        batch_sizes, context_lengths, prompt_len, decode_steps, repeats: see LatencySettings; the
            first batch size and context length rank the plans.
        world_size, allreduce_us: add the modeled step on W devices (segment times measured here,
            a fixed all-reduce latency assumed).
        backend, launch_config: the engine's op set and launch configuration.

    Returns:
        TuneResult (``.table()``, ``.write(dir)``, ``.plan`` = the recommendation).
    """
    metric, budget = _check_budget(budget_ppl, budget_kl)
    world_size = _check_world_size(world_size)
    settings = LatencySettings(tuple(batch_sizes), tuple(context_lengths), prompt_len, decode_steps, repeats,
                               backend=backend, launch_config=launch_config).check()
    extra = [p if isinstance(p, Candidate) else Candidate(f"plan {i + 1}: {_groups_str(p)}", p, "given")
             for i, p in enumerate(plans)]
    quality = quality if quality is not None else QualityCache(windows.to_dict() if windows is not None else None)
    if candidates is None:
        cands = candidate_plans(model, windows, parallel=parallel, max_groups=max_groups, plans=extra,
                                run_search=run_search, include_paper=include_paper, quality=quality,
                                search_kwargs=search_kwargs, progress=progress, backend=backend)
    else:
        num_layers = len(decoder_layers(model))
        for c in list(candidates) + extra:
            c.plan.validate_for(num_layers)
        cands = _dedupe(list(candidates) + extra)
    missing = quality.missing([c.plan for c in cands])
    if missing:
        if windows is None:
            raise ValueError(f"{len(missing)} candidate plans have no measured quality and no calibration windows "
                             "were given to measure it")
        quality.measure(model, windows, missing, batch_size=batch_size, progress=progress, backend=backend)
    rows = measure_candidates(model, cands, quality, settings, progress)
    return _assemble(model, rows, settings, metric, budget, world_size, allreduce_us, quality)


def _assemble(model, rows, settings: LatencySettings, metric, budget, world_size, allreduce_us,
              quality: QualityCache) -> TuneResult:
    from .report import environment

    device = next(model.parameters()).device
    first = rows[0]["latency"]
    label = device_label(device, first.get("cuda_graph"), first.get("backend"))
    key = settings.primary
    seg = None
    if world_size:
        num_layers = len(decoder_layers(model))
        sizes = {len(g) // world_size for r in rows for g in CQILPlan.from_dict(r["plan"]).parallel_groups
                 if len(g) % world_size == 0}
        costs = measure_segment_costs(model, settings, sizes | {1})
        seg = costs.to_dict()
        for r in rows:
            r["modeled_ms"] = modeled_column(CQILPlan.from_dict(r["plan"]), num_layers, world_size, costs,
                                             allreduce_us / 1e3)
    front = pareto_front(rows, key, metric)
    for r in rows:
        r["pareto"] = r["name"] in front
    rec = recommend(rows, key, metric, budget)
    s = {"batch_sizes": list(settings.batch_sizes), "context_lengths": list(settings.context_lengths),
         "prompt_len": settings.prompt_len, "decode_steps": settings.decode_steps, "repeats": settings.repeats,
         "warmup": "one untimed repeat per setting", "backend": first.get("backend"),
         "cuda_graph": first.get("cuda_graph"), "launch_config": first.get("launch_config"),
         "allreduce_us": allreduce_us if world_size else None,
         "quality_measured_by_tune": quality.measured_here}
    return TuneResult(rows=rows, settings=s, budget_metric=metric, budget=budget, latency_key=key, pareto=front,
                      recommended=rec, environment=environment(str(device)), device_label=label,
                      quality_text=quality.text, world_size=world_size, segment_costs=seg)
