"""analyze: similarity matrix shape/symmetry/diagonal, candidate costs, JSON round trip, plot."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cqil_kernels import get_plan
from cqil_kernels.analysis import LayerAnalysis, analyze, candidate_groups
from cqil_kernels.evaluate import compare_plans
from cqil_kernels.plan import CQILPlan
from cqil_kernels.texts import TokenWindows
from model_state import assert_unchanged, snapshot
from tiny_models import make_tiny

L = 7


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", num_layers=L, seed=2)


@pytest.fixture(scope="module")
def windows():
    g = torch.Generator().manual_seed(0)
    return TokenWindows(torch.randint(3, 97, (3, 20), generator=g), torch.tensor([1, 4, 1]), stride=20)


@pytest.fixture(scope="module")
def result(model, windows):
    return analyze(model, windows, parallel=2, batch_size=2, progress=False)


def test_similarity_shape_symmetry_unit_diagonal(result):
    sim = torch.tensor(result.similarity)
    assert sim.shape == (L, L)
    torch.testing.assert_close(sim, sim.T)
    torch.testing.assert_close(sim.diagonal(), torch.ones(L, dtype=sim.dtype))
    assert bool((sim <= 1 + 1e-6).all()) and bool((sim >= -1 - 1e-6).all())
    assert len(result.adjacent_similarity()) == L - 1


def test_similarity_matches_hidden_states(model, windows, result):
    """Inputs of layers 0..L-1 are hidden_states[0..L-1] of output_hidden_states."""
    with torch.no_grad():
        hs = model(windows.input_ids, output_hidden_states=True).hidden_states[:L]
    mask = windows.score_mask()
    vecs = torch.stack([torch.nn.functional.normalize(h[:, :-1][mask], dim=-1) for h in hs])
    expected = torch.einsum("ind,jnd->ij", vecs, vecs) / vecs.shape[1]
    torch.testing.assert_close(torch.tensor(result.similarity, dtype=torch.float32), expected, atol=1e-5, rtol=0)


def test_costs_cover_every_candidate_and_match_a_direct_measurement(model, windows, result):
    assert [c.group for c in result.costs] == [(i, i + 1) for i in range(L - 1)]
    assert get_plan(model) is None
    _, (direct,) = compare_plans(model, windows, [CQILPlan([[3, 4]])], progress=False)
    cost = result.cost_of((3, 4))
    assert cost.kl == pytest.approx(direct.kl, rel=1e-5)
    assert cost.ppl_increase == pytest.approx(direct.ppl_increase, rel=1e-5, abs=1e-9)
    ranked = result.ranked("kl")
    assert [c.kl for c in ranked] == sorted(c.kl for c in result.costs)
    with pytest.raises(KeyError):
        result.cost_of((0, 2))


def test_exclude_parallel_and_no_costs(model, windows):
    a = analyze(model, windows, parallel=3, exclude=[0, 6], progress=False)
    assert [c.group for c in a.costs] == [(1, 2, 3), (2, 3, 4), (3, 4, 5)]
    a = analyze(model, windows, measure_costs=False, progress=False)
    assert a.costs == [] and len(a.similarity) == L
    assert candidate_groups(5, 2, exclude=[2]) == [(0, 1), (3, 4)]
    with pytest.raises(ValueError, match="parallel"):
        candidate_groups(5, 1)
    with pytest.raises(ValueError, match="exceeds"):
        candidate_groups(3, 4)


def test_json_round_trip(result, tmp_path):
    path = tmp_path / "analysis.json"
    text = result.to_json(path)
    assert path.read_text().strip() == text
    back = LayerAnalysis.from_json(path)
    assert back.to_dict() == result.to_dict()
    assert LayerAnalysis.from_json(text).costs == result.costs


def test_plot_writes_png(result, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sub" / "analysis.png"
    result.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    LayerAnalysis.from_dict({**result.to_dict(), "costs": []}).plot(tmp_path / "sim.png")


def test_import_has_no_matplotlib_side_effect():
    code = "import sys, cqil_kernels, cqil_kernels.analysis, cqil_kernels.search, cqil_kernels.cli; " \
           "print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(exclude=[10]), ValueError, "out of range"),
        (dict(exclude=[-8]), ValueError, "out of range"),
        (dict(exclude=["1"]), TypeError, "ints"),
        (dict(backend="bogus"), ValueError, "unknown backend"),
        (dict(bypass=2), ValueError, "bypass"),
        (dict(parallel=1), ValueError, "parallel"),
        (dict(parallel=2.0), TypeError, "parallel"),
        (dict(batch_size=0), ValueError, "batch_size"),
    ],
)
def test_bad_arguments_raise_and_leave_a_converted_model_as_it_was(windows, kwargs, error, message):
    from cqil_kernels import convert

    m = convert(make_tiny("llama", num_layers=L, seed=2), CQILPlan([[3, 4]]), backend="torch")
    snap = snapshot(m)
    with pytest.raises(error, match=message):
        analyze(m, windows, **{"parallel": 2, "progress": False, **kwargs})
    assert_unchanged(m, snap)


def test_negative_exclude_counts_from_the_last_layer(model, windows):
    a = analyze(model, windows, parallel=2, exclude=[0, -1], measure_costs=False, progress=False)
    assert a.exclude == [0, L - 1]


def test_plot_marks_the_plan_groups(result, tmp_path):
    plain = result.plot(tmp_path / "plain.png") or (tmp_path / "plain.png")
    marked = tmp_path / "marked.png"
    result.plot(marked, plan=CQILPlan([[1, 2], [4, 5]]))
    assert marked.read_bytes()[:4] == b"\x89PNG" and marked.read_bytes() != plain.read_bytes()
