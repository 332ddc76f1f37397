"""evaluate / compare_plans: perplexity equals a direct computation; KL and agreement are right."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from cqil_kernels import convert, get_plan, revert
from cqil_kernels.evaluate import base_log_probs, compare_plans, evaluate, plan_applied
from cqil_kernels.plan import CQILPlan
from cqil_kernels.texts import TokenWindows
from model_state import assert_unchanged, snapshot
from tiny_models import make_tiny


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", num_layers=6, seed=1)


def _windows(n=5, t=24, seed=0, score_from=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (n, t), generator=g)
    sf = torch.tensor(score_from) if score_from is not None else torch.ones(n, dtype=torch.long)
    return TokenWindows(ids, sf, stride=t)


def _direct_ppl(model, windows):
    """HF's own loss with labels masked to -100 before score_from, token-weighted."""
    total, count = 0.0, 0
    for i in range(len(windows)):
        ids = windows.input_ids[i : i + 1]
        labels = ids.clone()
        labels[:, : int(windows.score_from[i])] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        k = int((labels[:, 1:] != -100).sum())
        total += float(loss) * k
        count += k
    return math.exp(total / count), count


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_perplexity_equals_direct_computation(model, batch_size):
    w = _windows(score_from=[1, 7, 1, 20, 3])
    result = evaluate(model, w, batch_size=batch_size, progress=False)
    ppl, count = _direct_ppl(model, w)
    assert result.num_tokens == count == w.num_scored
    assert result.perplexity == pytest.approx(ppl, rel=1e-5)
    assert result.kl is None and result.top1_agreement is None


def test_perplexity_of_text_with_tokenizer():
    class Tok:
        def __call__(self, text, add_special_tokens=False, verbose=True):
            return {"input_ids": [3 + ord(c) % 90 for c in text]}

    m = make_tiny("qwen2", num_layers=2)
    r = evaluate(m, "some text to score " * 10, Tok(), seq_len=32, stride=16, progress=False)
    assert r.num_tokens == len("some text to score " * 10) - 1  # strided: every token but the first


def _reference_kl(model, plan, windows):
    """KL(base || converted) and agreement with plain log_softmax, window by window."""
    kls, agree, n = 0.0, 0, 0
    for i in range(len(windows)):
        ids = windows.input_ids[i : i + 1]
        sf = int(windows.score_from[i])
        with torch.no_grad(), plan_applied(model, None):
            lb = F.log_softmax(model(ids).logits[0, sf - 1 : -1].double(), -1)
        with torch.no_grad(), plan_applied(model, plan):
            lc = F.log_softmax(model(ids).logits[0, sf - 1 : -1].double(), -1)
        kls += float((lb.exp() * (lb - lc)).sum())
        agree += int((lb.argmax(-1) == lc.argmax(-1)).sum())
        n += lb.shape[0]
    return kls / n, agree / n


def test_compare_plans_kl_agreement_and_state_restored(model):
    w = _windows(score_from=[1, 5, 1, 2, 9])
    plans = [CQILPlan([[2, 3]]), CQILPlan([[1, 2], [4, 5]]), None, CQILPlan([])]
    assert get_plan(model) is None
    base, results = compare_plans(model, w, plans, batch_size=2, progress=False)
    assert get_plan(model) is None
    assert base.kl == pytest.approx(0.0, abs=1e-6) and base.top1_agreement == 1.0
    for plan, r in zip(plans[:2], results[:2]):
        kl, agree = _reference_kl(model, plan, w)
        assert r.kl == pytest.approx(kl, rel=1e-4, abs=1e-7)
        assert r.top1_agreement == pytest.approx(agree)
        assert r.base_perplexity == pytest.approx(base.perplexity)
        assert r.kl > 0
    for r in results[2:]:  # sequential plans: identical to the base
        assert r.kl == pytest.approx(0.0, abs=1e-6) and r.top1_agreement == 1.0
        assert r.perplexity == pytest.approx(base.perplexity, rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_prefix_reuse_matches_full_forward(family):
    m = make_tiny(family, num_layers=6)
    w = _windows(n=3)
    plans = [CQILPlan([[3, 4]]), CQILPlan([[4, 5]]), CQILPlan([[0, 1], [3, 4]])]
    _, fast = compare_plans(m, w, plans, progress=False, reuse_prefix=True)
    _, full = compare_plans(m, w, plans, progress=False, reuse_prefix=False)
    assert [r.extra["started_at_layer"] for r in fast] == [3, 4, 0]
    for a, b in zip(fast, full):
        assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5)
        assert a.kl == pytest.approx(b.kl, rel=1e-4, abs=1e-8)
        assert a.top1_agreement == b.top1_agreement


def test_converted_model_compared_with_its_reverted_self(model):
    w = _windows()
    plan = CQILPlan([[2, 3]])
    separate_base = copy.deepcopy(model)
    convert(model, plan)
    try:
        same = evaluate(model, w, base_model=model, progress=False)
        assert get_plan(model) == plan  # still converted afterwards
        other = evaluate(model, w, base_model=separate_base, progress=False)
        stored = base_log_probs(model, w, batch_size=2, progress=False)
        assert get_plan(model) == plan
        pre = evaluate(model, w, base_model=stored, batch_size=2, progress=False)
    finally:
        revert(model)
    for r in (other, pre):
        assert r.perplexity == pytest.approx(same.perplexity, rel=1e-6)
        assert r.kl == pytest.approx(same.kl, rel=1e-4)
        assert r.top1_agreement == same.top1_agreement
        assert r.base_perplexity == pytest.approx(same.base_perplexity, rel=1e-6)
    assert same.ppl_increase == pytest.approx(same.perplexity / same.base_perplexity - 1)


def test_base_log_probs_must_match_batching(model):
    w = _windows()
    stored = base_log_probs(model, w, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="batches of 2"):
        evaluate(model, w, base_model=stored, batch_size=3, progress=False)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(model, "text without tokenizer", progress=False)
    with pytest.raises(TypeError, match="TokenWindows"):
        evaluate(model, 42, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        compare_plans(model, _windows(), [CQILPlan([[5, 6]])], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, _windows(), batch_size=0, progress=False)


def test_kl_is_accurate_for_a_large_vocabulary_and_large_logits():
    """Regression: a logsumexp shortcut cancelled to ~1e-3 nats/token at SmolLM2's scale."""
    from cqil_kernels.evaluate import _BaseBatch, _Stats

    g = torch.Generator().manual_seed(0)
    logits = 12 * torch.randn(64, 49152, generator=g) + 15
    other = logits + 0.05 * torch.randn(64, 49152, generator=g)
    base = _BaseBatch.from_logp(F.log_softmax(logits, -1))
    targets = torch.zeros(64, dtype=torch.long)
    same, diff = _Stats(), _Stats()
    same.add(logits.clone(), targets, base)
    diff.add(other.clone(), targets, base)
    lb, lo = F.log_softmax(logits.double(), -1), F.log_softmax(other.double(), -1)
    expected = float((lb.exp() * (lb - lo)).sum(-1).mean())
    assert abs(same.kl / same.count) < 2e-5
    assert diff.kl / diff.count == pytest.approx(expected, rel=1e-3, abs=2e-5)


def _converted(plan=CQILPlan([[2, 3]])):
    return convert(make_tiny("llama", num_layers=6, seed=1), plan, backend="torch")


@pytest.mark.parametrize(
    "call",
    [
        lambda m, w: compare_plans(m, w, [CQILPlan([[1, 2]])], backend="bogus", progress=False),
        lambda m, w: compare_plans(m, w, [CQILPlan([[4, 5]]), CQILPlan([[5, 6]])], progress=False),
        lambda m, w: compare_plans(m, w, [[[1, 2]]], progress=False),
        lambda m, w: compare_plans(m, w, [CQILPlan([[1, 2]])], batch_size=0, progress=False),
        lambda m, w: compare_plans(m, "text", [CQILPlan([[1, 2]])], progress=False),
        lambda m, w: evaluate(m, w, base_model=m, backend="bogus", progress=False),
        lambda m, w: evaluate(m, w, base_model="the base", progress=False),
        lambda m, w: base_log_probs(m, w, backend="bogus", progress=False),
        lambda m, w: plan_applied(m, CQILPlan([[1, 2]]), "bogus").__enter__(),
        lambda m, w: plan_applied(m, CQILPlan([[4, 9]])).__enter__(),
    ],
)
def test_bad_arguments_leave_a_converted_model_exactly_as_it_was(call):
    model = _converted()
    snap = snapshot(model)
    with pytest.raises((ValueError, TypeError)):
        call(model, _windows(n=2))
    assert_unchanged(model, snap)


def test_an_error_inside_the_block_restores_the_plan_and_backend():
    model = _converted()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="inside"):
        with plan_applied(model, CQILPlan([[0, 1], [4, 5]], bypass=1)):
            assert get_plan(model) == CQILPlan([[0, 1], [4, 5]], bypass=1)
            raise RuntimeError("inside the block")
    assert_unchanged(model, snap)


def test_a_plan_the_model_already_runs_is_not_reconverted():
    model = _converted()
    group = model.model.layers[2]._cqil_group
    with plan_applied(model, CQILPlan([[2, 3]]), "torch"):
        assert model.model.layers[2]._cqil_group is group
    assert model.model.layers[2]._cqil_group is group


def test_base_log_probs_store_head_inputs_and_give_the_log_probs(model):
    w = _windows(score_from=[1, 5, 1, 2, 9])
    stored = base_log_probs(model, w, batch_size=2, progress=False)
    assert stored.head_weight is not None and stored.chunks[0].shape[-1] == model.config.hidden_size
    for i, (start, end) in enumerate([(0, 2), (2, 4), (4, 5)]):
        ids, mask = w.input_ids[start:end], w.score_mask(start, end)
        with torch.no_grad():
            want = F.log_softmax(model(ids).logits[:, :-1][mask].float(), -1)
        torch.testing.assert_close(stored.log_probs(i), want, atol=1e-5, rtol=0)
    # the copy of the head is the model's head as it was: later changes do not reach it
    before = stored.log_probs(0).clone()
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    try:
        assert torch.equal(stored.log_probs(0), before)
    finally:
        with torch.no_grad():
            model.lm_head.weight.sub_(1.0)
