"""Converted models vs an independent layer-by-layer computation of the same group semantics."""

from __future__ import annotations

import pytest
import torch
from reference_group import reference_model
from tiny_models import FAMILIES, greedy_decode_logits, make_tiny, new_cache

import cqil_kernels as ck

# every (P, d) with 0 <= d <= P-1 for P = 2, 3, 4
PD = [(P, d) for P in (2, 3, 4) for d in range(P)]
# fp32 on CPU: a group reorders sums, so compare with a tolerance well above fp32 rounding
ATOL = 2e-4


def plan_for(P, d, num_layers=8):
    """One group of P layers from layer 1; with d <= 1 also a later pair (bypass applies to both)."""
    groups = [list(range(1, 1 + P))]
    if d <= 1 and P + 3 <= num_layers - 1:
        groups.append([P + 2, P + 3])
    return ck.CQILPlan(groups=groups, bypass=d)


def left_padded_batch(vocab=97, lengths=(9, 5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, T - n :] = 1
    return ids, mask


def converted_and_reference(family, plan, num_layers=8, **kw):
    model = make_tiny(family, num_layers=num_layers, **kw)
    ref = reference_model(model, plan.groups, plan.bypass)
    ck.convert(model, plan, backend="torch")
    return model, ref


def assert_close(a, b, atol=ATOL, what=""):
    err = (a.float() - b.float()).abs().max().item()  # abs: a signed max would hide errors
    assert err <= atol, f"{what} max abs error {err:.3g} > {atol:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("P,d", PD)
def test_prefill_left_padded_matches_reference(family, P, d):
    plan = plan_for(P, d)
    model, ref = converted_and_reference(family, plan)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.isfinite(out[valid]).all()
    assert_close(out[valid], want[valid], what=f"{family} P={P} d={d}")
    # the group must actually change the model (else the test proves nothing)
    base = make_tiny(family, num_layers=8)
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).logits
    assert (plain[valid] - out[valid]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("P,d", [(2, 1), (3, 2), (4, 0)])
def test_cached_decode_matches_reference(family, cache_kind, P, d):
    plan = plan_for(P, d)
    model, ref = converted_and_reference(family, plan)
    ids, mask = left_padded_batch(lengths=(6, 3))
    steps = 16

    max_len = ids.shape[1] + steps + 3
    got = greedy_decode_logits(model, ids, mask, new_cache(model, cache_kind, max_len), steps)
    want = greedy_decode_logits(ref, ids, mask, new_cache(ref, cache_kind, max_len), steps)
    assert got.shape == (2, steps + 1, 97)
    assert_close(got, want, atol=5e-4, what=f"{family} {cache_kind} decode")


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_tokens_match_reference(family):
    plan = ck.CQILPlan([[1, 2], [4, 5, 6]], bypass=1)
    model, ref = converted_and_reference(family, plan)
    ids, mask = left_padded_batch(lengths=(7, 4, 6))
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    got = model.generate(**kw, do_sample=False)
    want = ref.generate(**kw, do_sample=False)
    assert torch.equal(got, want)
    torch.manual_seed(5)
    got_s = model.generate(**kw, do_sample=True, top_k=20)
    torch.manual_seed(5)
    want_s = ref.generate(**kw, do_sample=True, top_k=20)
    assert torch.equal(got_s, want_s)
    got_static = model.generate(**kw, do_sample=False, cache_implementation="static")
    assert torch.equal(got_static, want)


def test_empty_plan_is_the_original_model_exactly():
    model = make_tiny("llama")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    ck.convert(model, ck.CQILPlan(groups=[]), backend="torch")
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)


def test_revert_restores_the_original_model_exactly():
    model = make_tiny("qwen3")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    classes = [type(layer) for layer in model.model.layers]
    ck.convert(model, ck.CQILPlan([[1, 2, 3]], bypass=2), backend="torch")
    assert ck.is_converted(model) and ck.get_plan(model) == ck.CQILPlan([[1, 2, 3]], bypass=2)
    ck.revert(model)
    assert not ck.is_converted(model) and ck.get_plan(model) is None
    assert [type(layer) for layer in model.model.layers] == classes
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
