"""Plans: construction, JSON round trip, the paper's S/E/P plans, and every bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import make_tiny

import cqil_kernels as ck
from cqil_kernels import CQILPlan


def test_contiguous_matches_the_reference_grouping():
    assert CQILPlan.contiguous(12, 30, 2).groups == tuple((s, s + 1) for s in range(12, 30, 2))
    # S14 E30 P4: 16 layers in 4 runs of 4
    assert CQILPlan.contiguous(14, 30, 4).groups == ((14, 15, 16, 17), (18, 19, 20, 21), (22, 23, 24, 25), (26, 27, 28, 29))
    # a short tail stays sequential: 12..29 in runs of 4 leaves 28, 29
    assert CQILPlan.contiguous(12, 30, 4).groups[-1] == (24, 25, 26, 27)
    assert CQILPlan.contiguous(5, 5, 2).groups == ()
    assert CQILPlan.contiguous(0, 10, 1).groups == ()


def test_json_round_trip(tmp_path):
    plan = CQILPlan([[1, 2, 3], [5, 6, 7]], bypass=2)
    assert CQILPlan.from_json(plan.to_json()) == plan
    path = tmp_path / "plan.json"
    plan.to_json(path)
    assert CQILPlan.from_json(path) == plan
    assert CQILPlan.from_json(str(path)) == plan
    import json

    assert json.loads(plan.to_json()) == {"groups": [[1, 2, 3], [5, 6, 7]], "bypass": 2}
    assert plan.num_sequential_steps(10) == 6


@pytest.mark.parametrize(
    "groups,bypass,match",
    [
        ([[1, 2], [2, 3]], 0, "overlap"),
        ([[1, 3]], 0, "gap"),
        ([[3, 2]], 0, "sorted"),
        ([[4, 5], [1, 2]], 0, "overlap|order"),
        ([[]], 0, "empty"),
        ([[1, 2]], 2, "bypass 2 is out of range"),
        ([[1, 2, 3]], -1, "bypass must be >= 0"),
        ([[-1, 0]], 0, "negative"),
        ([[1, 1]], 0, "sorted"),
    ],
)
def test_invalid_plans_name_the_problem(groups, bypass, match):
    with pytest.raises(ValueError, match=match):
        CQILPlan(groups, bypass=bypass)


@pytest.mark.parametrize("groups", ["12,13", [[1.0, 2.0]], [[True, False]], 5])
def test_plan_type_errors(groups):
    with pytest.raises(TypeError):
        CQILPlan(groups)


def test_bad_json(tmp_path):
    with pytest.raises(ValueError, match="not valid JSON"):
        CQILPlan.from_json("{groups")
    with pytest.raises(ValueError, match="not valid JSON"):
        CQILPlan.from_json("[[0, 1]")
    with pytest.raises(ValueError, match="unknown plan keys"):
        CQILPlan.from_json('{"groups": [], "bipass": 1}')
    with pytest.raises(FileNotFoundError):
        CQILPlan.from_json(tmp_path / "missing.json")


def test_per_group_bypass(tmp_path):
    plan = CQILPlan([[1, 2, 3], [5, 6], [8]], bypass=[2, 1, 0])
    assert plan.bypasses == (2, 1, 0) and [plan.bypass_of(i) for i in range(3)] == [2, 1, 0]
    assert plan.bypass == (2, 1, 0) and not plan.uniform_bypass
    import json

    assert json.loads(plan.to_json()) == {"groups": [[1, 2, 3], [5, 6], [8]], "bypass": [2, 1, 0]}
    assert CQILPlan.from_json(plan.to_json()) == plan
    plan.to_json(tmp_path / "p.json")
    assert CQILPlan.from_json(tmp_path / "p.json") == plan
    # all groups of 2+ layers agree: one int, the serialised form of old, and equal plans
    same = CQILPlan([[1, 2, 3], [5, 6], [8]], bypass=[1, 1, 0])
    assert same.bypass == 1 and same.uniform_bypass
    assert same == CQILPlan([[1, 2, 3], [5, 6], [8]], bypass=1)
    assert json.loads(same.to_json())["bypass"] == 1
    assert plan.with_bypass(0) == CQILPlan(plan.groups)
    assert repr(plan) == "CQILPlan(groups=[[1, 2, 3], [5, 6], [8]], bypass=[2, 1, 0])"
    assert CQILPlan([], bypass=[]).bypass == 0


@pytest.mark.parametrize(
    "groups,bypass,match",
    [
        ([[1, 2], [4, 5, 6]], [1], "bypass has 1 values for 2 groups"),
        ([[1, 2], [4, 5, 6]], [1, 2, 0], "bypass has 3 values for 2 groups"),
        ([[1, 2], [4, 5, 6]], [2, 0], r"bypass\[0\] = 2 is out of range for group 0"),
        ([[1, 2], [4, 5, 6]], [0, -1], r"bypass\[1\] = -1 is out of range"),
        ([[1], [4, 5, 6]], [1, 1], r"bypass\[0\] = 1 .* one-layer group runs sequentially"),
        # one rule for plans without a group of 2+ layers (issue 12 item 6): all refused alike
        ([], 3, "bypass 3 needs a group of at least 4 layers; this plan has no group of 2 or more"),
        ([[0]], 1, "bypass 1 needs a group of at least 2 layers; this plan has no group of 2 or more"),
        ([[0], [3]], 2, "no group of 2 or more"),
    ],
)
def test_invalid_bypass_names_the_rule(groups, bypass, match):
    with pytest.raises(ValueError, match=match):
        CQILPlan(groups, bypass=bypass)


def test_contiguous_with_parallel_1_follows_the_same_rule():
    assert CQILPlan.contiguous(0, 10, 1).groups == ()
    with pytest.raises(ValueError, match="no group of 2 or more layers"):
        CQILPlan.contiguous(0, 10, 1, bypass=1)
    # a one-int bypass skips one-layer groups of a plan that has larger ones
    assert CQILPlan([[0], [1, 2]], bypass=1).bypasses == (0, 1)


@pytest.mark.parametrize("bypass", ["1", [1.0, 0], [True, 0], 1.5])
def test_bypass_type_errors(bypass):
    with pytest.raises(TypeError, match="bypass"):
        CQILPlan([[1, 2], [3, 4]], bypass=bypass)


def test_from_json_tells_text_from_paths(tmp_path, monkeypatch):
    # JSON text that is not an object: a clear error, never "file not found"
    with pytest.raises(ValueError, match=r'must be an object .*did you mean \{"groups": \[\[0, 1\]\]\}'):
        CQILPlan.from_json("[[0, 1]]")
    assert CQILPlan.from_json('  \n {"groups": [[0, 1]], "bypass": 1}') == CQILPlan([[0, 1]], bypass=1)
    # a file whose name looks like JSON is still a file when it exists
    monkeypatch.chdir(tmp_path)
    (tmp_path / "[odd].json").write_text('{"groups": [[2, 3]]}')
    assert CQILPlan.from_json("[odd].json") == CQILPlan([[2, 3]])
    with pytest.raises(FileNotFoundError, match="plan file not found: nothere.json"):
        CQILPlan.from_json("nothere.json")
    with pytest.raises(ValueError, match="is a directory"):
        CQILPlan.from_json(tmp_path)
    with pytest.raises(TypeError, match="JSON text or a path"):
        CQILPlan.from_json(42)


def snapshot(model):
    return (
        [type(layer) for layer in model.model.layers],
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.data_ptr() for n, p in model.named_parameters()},
        copy.deepcopy(model.config.to_dict()),
    )


def assert_untouched(model, snap):
    classes, state, ptrs, cfg = snap
    assert [type(layer) for layer in model.model.layers] == classes
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    assert model.config.to_dict() == cfg
    assert not ck.is_converted(model)


@pytest.mark.parametrize(
    "plan,exc,match",
    [
        (CQILPlan([[4, 5, 6]]), ValueError, "out of range: the model has 6 layers"),
        (CQILPlan([[1, 2], [5, 6]]), ValueError, "out of range"),
        ("[[1, 2]]", TypeError, "plan must be a CQILPlan"),
        ({"groups": [[1, 3]]}, ValueError, "gap"),
    ],
)
def test_convert_rejects_bad_plans_and_leaves_the_model_untouched(plan, exc, match):
    model = make_tiny("llama", num_layers=6)
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        ck.convert(model, plan, backend="torch")
    assert_untouched(model, snap)


def test_convert_rejects_unsupported_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match="no decoder layer list|unsupported"):
        ck.convert(gpt2, CQILPlan([[0, 1]]))
    with pytest.raises(TypeError, match="nn.Module"):
        ck.convert("not a model", CQILPlan([[0, 1]]))


def test_convert_rejects_unknown_backend_and_double_conversion():
    model = make_tiny("llama", num_layers=6)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="unknown backend"):
        ck.convert(model, CQILPlan([[1, 2]]), backend="cuda-magic")
    assert_untouched(model, snap)
    ck.convert(model, CQILPlan([[1, 2]]), backend="torch")
    with pytest.raises(ValueError, match="already CQIL-converted"):
        ck.convert(model, CQILPlan([[3, 4]]), backend="torch")
    assert ck.get_plan(model) == CQILPlan([[1, 2]])


def test_convert_without_plan_needs_one_in_the_config():
    model = make_tiny("llama", num_layers=6)
    with pytest.raises(ValueError, match="no plan given"):
        ck.convert(model)


def test_convert_rejects_mixed_attention_types_in_a_group():
    model = make_tiny(
        "qwen2",
        num_layers=6,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=2,
        layer_types=["full_attention"] * 2 + ["sliding_attention"] * 4,
    )
    snap = snapshot(model)
    with pytest.raises(ValueError, match="mixes attention types"):
        ck.convert(model, CQILPlan([[1, 2]]), backend="torch")
    assert_untouched(model, snap)


def test_convert_rejects_non_silu_models():
    model = make_tiny("llama", num_layers=6, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act"):
        ck.convert(model, CQILPlan([[1, 2]]), backend="torch")
