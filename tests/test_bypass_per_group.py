"""Plans with a different bypass per group: converted models vs the independent oracle
(tests/reference_group.py) on the four families, torch backend; save/reload keeps the list."""

from __future__ import annotations

import json

import pytest
import torch
from reference_group import reference_model
from test_conversion import left_padded_batch
from tiny_models import FAMILIES, greedy_decode_logits, make_tiny, new_cache

import cqil_kernels as ck

PLANS = [
    ck.CQILPlan([[1, 2, 3], [4, 5], [6, 7]], bypass=[2, 0, 1]),
    ck.CQILPlan([[1, 2, 3, 4], [5, 6, 7]], bypass=[1, 2]),
]
ATOL = 2e-4



def err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def converted_and_reference(family, plan):
    model = make_tiny(family, num_layers=8)
    ref = reference_model(model, plan.groups, plan.bypasses)
    ck.convert(model, plan, backend="torch")
    return model, ref


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("plan", PLANS, ids=["3-2-2", "4-3"])
def test_prefill_left_padded_matches_reference(family, plan):
    model, ref = converted_and_reference(family, plan)
    assert [g.bypass for g in {id(l._cqil_group): l._cqil_group for l in model.model.layers
                               if hasattr(l, "_cqil_group")}.values()] == list(plan.bypasses)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
        # the same groups with one bypass for all differ: the per-group values are really used
        uniform = reference_model(make_tiny(family, num_layers=8), plan.groups, 0)(
            input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.isfinite(out[valid]).all()
    assert err(out[valid], want[valid]) <= ATOL
    assert err(uniform[valid], want[valid]) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_cached_decode_matches_reference(family, cache_kind):
    plan = PLANS[0]
    model, ref = converted_and_reference(family, plan)
    ids, mask = left_padded_batch(lengths=(6, 3))
    steps = 16
    max_len = ids.shape[1] + steps + 3
    got = greedy_decode_logits(model, ids, mask, new_cache(model, cache_kind, max_len), steps)
    want = greedy_decode_logits(ref, ids, mask, new_cache(ref, cache_kind, max_len), steps)
    assert err(got, want) <= 5e-4


def test_save_reload_keeps_the_per_group_bypass(tmp_path):
    plan = PLANS[0]
    model = make_tiny("qwen3", num_layers=8)
    ck.convert(model, plan, backend="torch")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["cqil"]
    assert stored == {"groups": [[1, 2, 3], [4, 5], [6, 7]], "bypass": [2, 0, 1]}
    again = ck.from_pretrained(tmp_path, backend="torch")
    assert ck.get_plan(again) == plan
    with torch.no_grad():
        after = again(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[pytest.mark.interpreter, pytest.mark.slow])])
def test_decode_engine_matches_the_reference(backend, monkeypatch):
    """The decode engine (segments are the groups, each with its own d) gives the oracle's tokens."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    plan = ck.CQILPlan([[1, 2, 3], [4, 5]], bypass=[2, 1])
    model = make_tiny("llama", num_layers=6)
    ref = reference_model(model, plan.groups, plan.bypasses)
    ck.convert(model, plan, backend="torch")
    ids, mask = left_padded_batch(lengths=(7, 4))
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    engine = ck.DecodeEngine(model, max_batch_size=2, max_length=20, backend=backend, cuda_graph=False)
    assert torch.equal(engine.generate(ids, mask, max_new_tokens=6), want)


@pytest.mark.interpreter
def test_triton_backend_matches_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    plan = ck.CQILPlan([[1, 2, 3], [4, 5]], bypass=[2, 0])
    model = make_tiny("qwen2", num_layers=6)
    ref = reference_model(model, plan.groups, plan.bypasses)
    ck.convert(model, plan, backend="triton")
    ids, mask = left_padded_batch(lengths=(6, 4))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert err(got[valid], want[valid]) <= 1e-3
