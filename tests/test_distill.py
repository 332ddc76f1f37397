"""distill: LoRA + KL to the unconverted model on tiny converted models."""

from __future__ import annotations

import pytest
import torch
from model_state import assert_unchanged, snapshot
from tiny_models import make_tiny

import cqil_kernels as ck
from cqil_kernels.conversion import decoder_layers
from cqil_kernels.texts import TokenWindows

pytest.importorskip("peft")
from cqil_kernels.distill import DistillResult, distill  # noqa: E402
from cqil_kernels.evaluate import base_log_probs, evaluate  # noqa: E402

PLAN = ck.CQILPlan([[2, 3], [4, 5]], bypass=0)
FAST = dict(rank=4, steps=12, lr=3e-3, batch_size=2, progress=False)


def windows(n=6, T=24, seed=0) -> TokenWindows:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (n, T), generator=g)
    return TokenWindows(ids, torch.ones(n, dtype=torch.long), T, "random")


def converted(family="llama", seed=0):
    model = make_tiny(family, num_layers=6, seed=seed)
    return ck.convert(model, PLAN, backend="torch")


def kl_on(model, w, base):
    return evaluate(model, w, base_model=base, batch_size=2, progress=False, backend="torch").kl


def test_loss_and_calibration_kl_go_down():
    model = converted()
    w = windows()
    base = base_log_probs(model, w, batch_size=2, progress=False, backend="torch")
    kl_before = kl_on(model, w, base)
    res = distill(model, w, **{**FAST, "steps": 30})
    assert isinstance(res, DistillResult) and res.steps == 30 and len(res.losses) == 30
    assert sum(res.losses[-5:]) / 5 < 0.7 * sum(res.losses[:5]) / 5
    kl_after = kl_on(res.model, w, base)
    assert kl_after < 0.7 * kl_before
    assert res.model is model and ck.get_plan(model) == PLAN
    assert res.tokens_seen == 30 * 2 * 24 and res.teacher == "cache" and res.prefix_layers == 2
    d = res.to_dict()
    assert d["steps"] == 30 and "model" not in d and res.to_json()


def test_only_adapters_train():
    model = converted()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = distill(model, windows(), merge=False, **FAST)
    pm = res.model
    assert hasattr(pm, "peft_config")
    lora, base = {}, {}
    for n, p in pm.named_parameters():
        (lora if "lora_" in n else base)[n] = p
    # adapters only on q/k/v/o/gate/up/down of the grouped layers 2..5
    assert len([n for n in lora if n.endswith("lora_A.default.weight")]) == 4 * 7
    assert not any(f"layers.{i}." in n for n in lora for i in (0, 1))
    assert all(p.grad is not None for p in lora.values())
    assert any(float(p.abs().max()) > 0 for n, p in lora.items() if "lora_B" in n)
    assert all(p.grad is None for p in base.values())
    unwrapped = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in base.items()}
    assert set(unwrapped) == set(before)
    for n, p in unwrapped.items():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("family,teacher", [("llama", "cache"), ("qwen2", "online")])
def test_merged_model_equals_peft_model_and_runs_fused(family, teacher):
    w = windows()
    ids = windows(2, 16, seed=5).input_ids
    peft_res = distill(converted(family), w, merge=False, teacher=teacher, **FAST)
    with torch.no_grad():
        want = peft_res.model(input_ids=ids).logits
    merged_res = distill(converted(family), w, teacher=teacher, **FAST)
    model = merged_res.model
    assert merged_res.losses == peft_res.losses  # same seed, same run
    assert ck.get_plan(model) == PLAN
    layers = decoder_layers(model)
    assert all(type(layer.self_attn.q_proj) is torch.nn.Linear for layer in layers)
    with torch.no_grad():
        groups = [layers[g[0]]._cqil_group for g in PLAN.groups]
        fused = [g.fused_weights() for g in groups]
        assert [why for _, why in fused] == [None] * len(fused)  # the merged plain linears run the kernels again
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    # the kernels read the merged weights themselves
    for g, (w, _) in zip(groups, fused):
        assert w.o[1] is layers[g.indices[1]].self_attn.o_proj.weight


def test_teacher_modes_and_prefix_reuse_agree():
    w = windows()
    a = distill(converted(), w, teacher="cache", **FAST)
    b = distill(converted(), w, teacher="online", reuse_prefix=False, **FAST)
    assert a.prefix_layers == 2 and b.prefix_layers == 0 and b.teacher == "online"
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), atol=1e-4, rtol=1e-3)


def test_deterministic_for_a_seed_and_seed_matters():
    w = windows()
    a = distill(converted(), w, seed=1, **FAST)
    b = distill(converted(), w, seed=1, **FAST)
    c = distill(converted(), w, seed=2, **FAST)
    assert a.losses == b.losses
    assert a.losses != c.losses
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n


def test_eval_windows_before_after_against_the_original():
    w = windows()
    res = distill(converted(), w, eval_windows=windows(3, 24, seed=9), **{**FAST, "steps": 20})
    assert res.before["kl"] > 0 and res.after["kl"] < res.before["kl"]
    # the base stays the original model (not the reverted, merged one)
    assert res.before["base_perplexity"] == pytest.approx(res.after["base_perplexity"], rel=1e-6)


def test_target_all_adapts_every_layer():
    res = distill(converted(), windows(), merge=False, target="all", **{**FAST, "steps": 2})
    names = [n for n, _ in res.model.named_parameters() if n.endswith("lora_A.default.weight")]
    assert len(names) == 6 * 7 and res.prefix_layers == 0


def test_errors():
    w = windows()
    with pytest.raises(ValueError, match="not converted"):
        distill(make_tiny("llama", num_layers=6), w, **FAST)
    import peft

    pm = peft.get_peft_model(converted(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError):
        distill(pm, w, **FAST)


def test_max_seconds_shortens_the_run():
    res = distill(converted(), windows(), max_seconds=1e-6, **{**FAST, "steps": 50})
    assert res.steps == 2


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=2.5), TypeError, "steps"),
        (dict(rank=0), ValueError, "rank"),
        (dict(batch_size=-2), ValueError, "batch_size"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(max_seconds=-5.0), ValueError, "max_seconds"),
        (dict(warmup=-1), ValueError, "warmup"),
        (dict(alpha=0.0), ValueError, "alpha"),
        (dict(teacher="gpu"), ValueError, "teacher"),
        (dict(schedule="step"), ValueError, "schedule"),
        (dict(target="some"), ValueError, "target"),
        (dict(merge="yes"), TypeError, "merge"),
        (dict(windows=None), TypeError, "windows must be TokenWindows"),
        (dict(eval_windows="text"), TypeError, "eval_windows must be TokenWindows"),
        (dict(windows=TokenWindows(torch.full((2, 8), 500), torch.ones(2, dtype=torch.long), 8)), ValueError,
         "vocabulary"),
    ],
)
def test_bad_arguments_raise_before_the_model_changes(kwargs, error, message):
    model = converted()
    snap = snapshot(model)
    args = {**FAST, "windows": windows(), **kwargs}
    w = args.pop("windows")
    with pytest.raises(error, match=message):
        distill(model, w, **args)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("teacher", ["cache", "online"])
def test_failure_during_training_leaves_the_model_as_it_was(teacher, monkeypatch):
    import importlib

    distill_module = importlib.import_module("cqil_kernels.distill")  # the package exports a function of that name

    model = converted()
    model.train()  # the caller's mode comes back too
    snap = snapshot(model)
    calls = []

    def failing_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in step 2")
        return real_loss(*args, **kwargs)

    real_loss = distill_module._chunked_kl_backward
    monkeypatch.setattr(distill_module, "_chunked_kl_backward", failing_loss)
    with pytest.raises(RuntimeError, match="injected"):
        distill(model, windows(), teacher=teacher, eval_windows=windows(2, 24, seed=3), **FAST)
    assert_unchanged(model, snap)
    assert not any("lora" in n for n, _ in model.named_modules())
    monkeypatch.setattr(distill_module, "_chunked_kl_backward", real_loss)
    res = distill(model, windows(), teacher=teacher, **{**FAST, "steps": 2})  # and it can be distilled again
    assert res.steps == 2 and ck.get_plan(model) == PLAN


def test_fixed_steps_by_default_and_flags_restored():
    model = converted()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    res = distill(model, windows(), **{**FAST, "steps": 5})
    assert res.steps == 5 and res.settings["max_seconds"] is None
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_chunked_loss_gives_the_gradient_of_the_whole_batch():
    from cqil_kernels.distill import _chunked_kl_backward, _kl

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=True)
    for p in head.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 7, 8, requires_grad=True)
    teacher_h = torch.randn(3, 7, 8)
    w = torch.randn(8, 8)
    loss = _chunked_kl_backward(head, x @ w, teacher_h, temperature=2.0, chunk=4)  # 21 rows: 4+4+...+1
    got = x.grad.clone()
    x.grad = None
    tlogp = torch.log_softmax(head(teacher_h).reshape(-1, 50) / 2.0, -1)
    ref = _kl(head(x @ w).reshape(-1, 50), tlogp, 2.0)
    ref.backward()
    assert loss == pytest.approx(float(ref), rel=1e-5)
    torch.testing.assert_close(got, x.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("target", ["grouped", "all"])
def test_activation_checkpointing_trains_the_same_adapters(target, monkeypatch):
    """Checkpointed layers recompute their activations in the backward: same losses and the same
    merged weights as without (to float rounding), on a model with groups (the leader computes
    the whole group inside its checkpoint) and with a frozen prefix."""
    import torch.utils.checkpoint as tuc

    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for ckpt in (False, True):
        model = converted()
        res = distill(model, windows(), target=target, checkpointing=ckpt, **{**FAST, "steps": 4})
        # every trained layer's forward went through a checkpoint in each of the 4 steps
        trained = 6 - (2 if target == "grouped" else 0)  # the frozen prefix (layers 0-1) is skipped
        assert len(calls) == (4 * trained if ckpt else 0), len(calls)
        runs[ckpt] = (res.losses, {n: p.detach().clone() for n, p in model.named_parameters()})
        assert res.settings["checkpointing"] is ckpt
        assert all("forward" not in vars(layer) for layer in decoder_layers(model))  # patch removed
    (loss0, w0), (loss1, w1) = runs[False], runs[True]
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    for n in w0:
        torch.testing.assert_close(w1[n], w0[n], atol=1e-6, rtol=1e-5)


def test_checkpointing_is_checked_like_the_other_flags():
    with pytest.raises(TypeError, match="checkpointing"):
        distill(converted(), windows(), checkpointing="yes", **FAST)
