"""search: N groups or a budget, exclusions, determinism, contiguous comparison, errors."""

from __future__ import annotations

import json

import pytest
import torch

from cqil_kernels import get_plan
from cqil_kernels.analysis import analyze
from cqil_kernels.evaluate import compare_plans
from cqil_kernels.search import contiguous_plans, search
from cqil_kernels.texts import TokenWindows
from tiny_models import make_tiny

L = 10


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", num_layers=L, seed=3)


@pytest.fixture(scope="module")
def windows():
    g = torch.Generator().manual_seed(1)
    return TokenWindows(torch.randint(3, 97, (2, 16), generator=g), torch.ones(2, dtype=torch.long), stride=16)


@pytest.fixture(scope="module")
def analysis(model, windows):
    return analyze(model, windows, parallel=2, progress=False)


def _layers(plan):
    return {layer for g in plan.groups for layer in g}


@pytest.mark.parametrize("n", [1, 3, 5])
def test_returns_n_disjoint_groups(model, windows, analysis, n):
    res = search(model, windows, 2, groups=n, analysis=analysis, progress=False)
    assert len(res.plan.groups) == n
    assert all(len(g) == 2 for g in res.plan.groups)
    assert len(_layers(res.plan)) == 2 * n  # disjoint (CQILPlan also validates this)
    res.plan.validate_for(L)
    assert get_plan(model) is None


def test_plan_metrics_are_verified_as_a_whole(model, windows, analysis):
    res = search(model, windows, 2, groups=3, analysis=analysis, progress=False)
    _, (direct,) = compare_plans(model, windows, [res.plan], progress=False)
    assert res.calib["kl"] == pytest.approx(direct.kl, rel=1e-5)
    assert res.calib["ppl_increase"] == pytest.approx(direct.ppl_increase, rel=1e-5, abs=1e-9)
    assert res.calib["predicted_kl"] == pytest.approx(sum(analysis.cost_of(g).kl for g in res.plan.groups))
    assert any(s["accepted"] for s in res.steps)


@pytest.mark.parametrize("exclude", [[0], [0, 1, 9], [2, 5, 8], [3, 4, 5, 6]])
def test_never_touches_excluded_layers(model, windows, analysis, exclude):
    res = search(model, windows, 2, budget=10.0, budget_metric="kl", exclude=exclude, analysis=analysis,
                 beam=2, progress=False, contiguous_top=None)
    assert not _layers(res.plan) & set(exclude)
    assert res.plan.groups  # a generous budget takes groups
    for c in res.contiguous:
        assert not {layer for g in c["groups"] for layer in g} & set(exclude)
    for s in res.steps:
        assert not {layer for g in s["groups"] for layer in g} & set(exclude)


@pytest.mark.parametrize("metric", ["kl", "ppl"])
def test_budget_is_respected(model, windows, analysis, metric):
    budget_all = search(model, windows, 2, budget=1e9, budget_metric=metric, analysis=analysis, beam=2,
                        progress=False)
    # unlimited budget: groups are added until no candidate fits next to them
    taken = _layers(budget_all.plan)
    assert len(budget_all.plan.groups) >= L // 4
    assert all(set(c.group) & taken for c in analysis.costs)
    key = "kl" if metric == "kl" else "ppl_increase"
    costs = sorted(analysis.costs, key=lambda c: c.metric(metric))
    budget = max(costs[1].metric(metric), 0.0) * 1.5 + 1e-9
    res = search(model, windows, 2, budget=budget, budget_metric=metric, analysis=analysis, beam=2, progress=False)
    assert res.calib[key] <= budget
    for s in res.steps:
        if s["accepted"]:
            assert s[key] <= budget
    capped = search(model, windows, 2, groups=2, budget=1e9, analysis=analysis, progress=False)
    assert len(capped.plan.groups) == 2


def test_zero_budget_can_give_empty_plan(model, windows, analysis):
    res = search(model, windows, 2, budget=0.0, budget_metric="kl", analysis=analysis, progress=False)
    assert res.plan.groups == () and res.calib["kl"] == 0.0
    assert json.loads(res.plan.to_json()) == {"groups": [], "bypass": 0}


def test_deterministic_for_a_seed(model, windows, analysis):
    a = search(model, windows, 2, groups=3, analysis=analysis, seed=7, progress=False)
    b = search(model, windows, 2, groups=3, analysis=analysis, seed=7, progress=False)
    assert a.plan == b.plan and a.calib == b.calib and a.steps == b.steps


def test_contiguous_comparison_and_json(model, windows, analysis, tmp_path):
    res = search(model, windows, 2, groups=2, analysis=analysis, contiguous_top=None, swap_rounds=1, progress=False)
    assert len(res.contiguous) == len(contiguous_plans(L, 2, 2)) == L - 4 + 1
    measured = [c for c in res.contiguous if "kl" in c]
    assert len(measured) == len(res.contiguous)
    assert res.best_contiguous["kl"] == min(c["kl"] for c in measured)
    # the search may choose non-contiguous groups but is never worse than its own greedy start
    assert res.calib["kl"] <= min(s["kl"] for s in res.steps if s["step"] == "add 2") + 1e-12
    data = json.loads(res.to_json(tmp_path / "search.json"))
    assert data["plan"] == res.plan.to_dict() and "analysis" not in data
    assert "analysis" in json.loads(res.to_json(include_analysis=True))


def test_runs_its_own_analysis_with_parallel_3_and_bypass(model, windows):
    res = search(model, windows, 3, groups=2, bypass=1, progress=False, contiguous_top=0)
    assert all(len(g) == 3 for g in res.plan.groups) and res.plan.bypass == 1
    assert res.contiguous and all("kl" not in c for c in res.contiguous)


def test_errors(model, windows, analysis):
    with pytest.raises(ValueError, match="number of groups, a quality budget"):
        search(model, windows, 2, analysis=analysis, progress=False)
    with pytest.raises(ValueError, match="only 4 disjoint groups"):
        search(model, windows, 2, groups=6, exclude=[0], analysis=analysis, progress=False)
    with pytest.raises(ValueError, match="budget_metric"):
        search(model, windows, 2, budget=0.1, budget_metric="loss", analysis=analysis, progress=False)
    with pytest.raises(ValueError, match="exclude"):
        search(model, windows, 2, groups=1, exclude=[L], analysis=analysis, progress=False)
    with pytest.raises(ValueError, match="analysis measured groups of 2"):
        search(model, windows, 3, groups=1, analysis=analysis, progress=False)
    with pytest.raises(ValueError, match="bypass"):
        search(model, windows, 2, groups=1, bypass=2, analysis=analysis, progress=False)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(groups=2.5), TypeError, "groups must be an int"),
        (dict(groups=True), TypeError, "groups must be an int"),
        (dict(groups=0), ValueError, "groups must be >= 1"),
        (dict(groups=2, swap_rounds=-1), ValueError, "swap_rounds must be >= 0"),
        (dict(groups=2, contiguous_top=-1), ValueError, "contiguous_top must be >= 0"),
        (dict(groups=2, swap_candidates=0), ValueError, "swap_candidates must be >= 1"),
        (dict(groups=2, beam=0), ValueError, "beam must be >= 1"),
        (dict(groups=2, batch_size=0), ValueError, "batch_size must be >= 1"),
        (dict(budget="0.1"), TypeError, "budget must be a number"),
        (dict(groups=2, rank_metric="loss"), ValueError, "rank_metric"),
        (dict(groups=2, calibrate_options={"keep_original": True}), ValueError, "may not set"),
        (dict(groups=2, calibrate_options=[1]), TypeError, "calibrate_options"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(model, windows, kwargs, exc, match, monkeypatch):
    import sys

    search_module = sys.modules["cqil_kernels.search"]  # the package attribute is the function

    def no_work(*a, **k):
        raise AssertionError("search did work before checking its arguments")

    monkeypatch.setattr(search_module, "analyze", no_work)
    monkeypatch.setattr(search_module, "compare_plans", no_work)
    with pytest.raises(exc, match=match):
        search(model, windows, 2, progress=False, **kwargs)


def test_empty_plan_with_a_bypass_is_the_sequential_plan(model, windows):
    a3 = analyze(model, windows, parallel=3, bypass=2, progress=False)
    res = search(model, windows, 3, budget=0.0, budget_metric="kl", bypass=2, analysis=a3, progress=False)
    assert res.plan.groups == () and res.plan.bypass == 0


@pytest.mark.parametrize("metric", ["kl", "ppl"])
def test_ranking_metric_is_the_one_asked_for_and_reported(model, windows, analysis, metric):
    res = search(model, windows, 2, groups=2, rank_metric=metric, analysis=analysis, progress=False)
    assert res.rank_metric == metric and res.calib["ranked_by"] == metric
    key = "kl" if metric == "kl" else "ppl_increase"
    first = [s for s in res.steps if s["step"] == "add 1"]
    assert next(s for s in first if s["accepted"])[key] == min(s[key] for s in first)


def test_corrected_search_ranks_by_the_cost_after_calibration(windows):
    from cqil_kernels.calibrate import calibrate

    model = make_tiny("llama", num_layers=8, seed=4)
    g = torch.Generator().manual_seed(2)
    calib = TokenWindows(torch.randint(3, 97, (8, 32), generator=g), torch.ones(8, dtype=torch.long), stride=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = search(model, calib, 2, groups=2, corrected=True, progress=False, contiguous_top=1, beam=2)
    assert res.corrected and res.calib["corrected"] and res.gains is not None
    assert set(res.gains) == {f"{s}-{s + 1}" for s in range(7)}
    assert all(s["step"] for s in res.steps)
    # weights and conversion restored after every measurement
    assert get_plan(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the reported cost is the calibrated plan's cost against the original model
    cal = calibrate(model, res.plan, calib, keep_original=True, progress=False)
    assert cal.plan == res.plan  # same choices, bypass per group included
    with cal.sequential_original(model):
        _, (direct,) = compare_plans(model, calib, [cal.plan], progress=False)
    cal.restore(model)
    assert res.calib["kl"] == pytest.approx(direct.kl, rel=1e-5)
    plain = search(model, calib, 2, groups=2, progress=False, contiguous_top=0, beam=2)
    assert res.calib["kl"] < plain.calib["kl"]
