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
