"""transformers' own behaviours, run against converted tiny models.

What a user of a converted model relies on from transformers, each checked against the
independent oracle (``reference_group``: the unconverted model patched to compute the same group
semantics) or against the converted model's own earlier outputs:

- generation: greedy, seeded sampling, beam search, assisted decoding (incl. output_attentions),
  static cache, continuing from returned ``past_key_values``, left padding;
- model outputs: ``output_attentions`` / ``output_hidden_states`` (one entry per layer, every
  layer of a group with its own attention probabilities), eager vs sdpa attention;
- model surgery and training: ``resize_token_embeddings``, gradient checkpointing, ``.to(dtype)``;
- saving: ``save_pretrained`` + ``cqil_kernels.from_pretrained`` / plain ``from_pretrained`` +
  ``convert``, ``torch.save(state_dict)``, safetensors, accelerate, PEFT adapters, deepcopy,
  pickling the whole model, ``load_state_dict(assign=True)``.

Written from the behaviours (transformers' generation and modeling test mixins name which ones
matter); nothing is copied from them. Tiny models (4 layers, hidden 48), a few tokens: the module
runs in seconds.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from reference_group import reference_model
from tiny_models import FAMILIES, make_tiny

import cqil_kernels as ck

NUM_LAYERS = 4
# Layer 0 stays sequential, layers 1-3 form one group of P = 3 with a bypass: both kinds of layer,
# and a group whose last layer's MLP input carries another layer's attention output.
PLAN = ck.CQILPlan([[1, 2, 3]], bypass=1)
# fp32 on CPU: a group reorders sums. Observed: 3e-8 on logits of magnitude 0.5; the bound is
# relative to the magnitude of the expected tensor (hidden states grow to ~10).
RTOL = 1e-6
VOCAB = 97


def converted(family="llama", seed=0, attn_implementation="sdpa", plan=PLAN, num_layers=NUM_LAYERS):
    """A converted tiny model (torch backend) and its oracle (an unconverted patched deep copy)."""
    model = make_tiny(family, num_layers=num_layers, seed=seed, attn_implementation=attn_implementation)
    oracle = reference_model(model, plan.groups, plan.bypass)
    ck.convert(model, plan, backend="torch")
    return model, oracle


def prompt(batch=2, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def left_padded(lengths=(7, 4, 6), seed=1):
    """Left-padded ids and mask, and the unpadded rows."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = r
        mask[b, T - len(r) :] = 1
    return ids, mask, rows


def gen_kwargs(new_tokens=5, force_length=True, **kw):
    # min_new_tokens: no early EOS from a random model, so every run has the same length.
    # transformers 4.57 refuses it with an assistant model (force_length=False there).
    if force_length:
        kw["min_new_tokens"] = new_tokens
    return dict(max_new_tokens=new_tokens, pad_token_id=0, **kw)


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()  # abs: a signed max would hide errors


def assert_close(a, b, atol=None, what=""):
    """|a - b| <= atol everywhere; atol defaults to RTOL x max(1, max |b|)."""
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    if atol is None:
        atol = RTOL * max(1.0, b.abs().max().item())
    err = max_err(a, b)
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:.3g}"


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@contextlib.contextmanager
def fused_calls():
    """Counts calls of the torch op set's grouped ops: a group on the fused path calls each once
    per forward; a group that fell back to the layers' own modules calls none."""
    from cqil_kernels.backends import get_ops

    ops = get_ops("torch")
    counts = {}
    with pytest.MonkeyPatch.context() as mp:
        for name in ("qkv_gemm", "batched_gemm", "gate_up_silu", "down_sum"):
            original = getattr(ops, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                counts[_name] = counts.get(_name, 0) + 1
                return _original(*args, **kwargs)

            mp.setattr(ops, name, spy)
        yield counts


def assert_fused(model, ids, groups=1):
    with fused_calls() as counts:
        logits(model, ids)
    assert counts == {"qkv_gemm": groups, "batched_gemm": groups, "gate_up_silu": groups, "down_sum": groups}, (
        f"the group did not run the fused path: grouped-op calls {counts}"
    )


# ---------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_the_oracle(family):
    model, oracle = converted(family)
    ids = prompt()
    kw = gen_kwargs(6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    got, want = model.generate(ids, **kw), oracle.generate(ids, **kw)
    assert got.sequences.shape == (2, 12)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        assert_close(a, b, what=f"{family} step {step} logits")


def test_sampling_with_a_seed_matches_the_oracle_and_repeats():
    model, oracle = converted("qwen2")
    ids = prompt()
    kw = gen_kwargs(6, do_sample=True, top_k=20, top_p=0.9, temperature=0.8)
    runs = []
    for m in (model, model, oracle):
        torch.manual_seed(123)
        runs.append(m.generate(ids, **kw))
    assert torch.equal(runs[0], runs[1]), "the same seed gave different samples"
    assert torch.equal(runs[0], runs[2])
    torch.manual_seed(124)
    assert not torch.equal(model.generate(ids, **kw), runs[0]), "sampling ignored the seed"


def test_beam_search_matches_the_oracle():
    model, oracle = converted("qwen3")
    ids = prompt(length=5)
    kw = gen_kwargs(5, num_beams=3, num_return_sequences=2, do_sample=False, return_dict_in_generate=True, output_scores=True)
    got, want = model.generate(ids, **kw), oracle.generate(ids, **kw)
    assert got.sequences.shape[0] == 4
    assert torch.equal(got.sequences, want.sequences)
    assert_close(got.sequences_scores, want.sequences_scores, what="beam scores")


def test_assisted_decoding_gives_greedy_tokens():
    """Assisted decoding with greedy verification yields exactly the main model's greedy tokens,
    with a plain draft model and with a converted one."""
    model, _ = converted("llama")
    ids = prompt(batch=1)
    kw = gen_kwargs(8, force_length=False, do_sample=False)
    greedy = model.generate(ids, **kw)
    assert greedy.shape[1] - ids.shape[1] >= 6  # this prompt does not hit EOS at once
    plain_draft = make_tiny("llama", num_layers=2, seed=5)
    converted_draft = ck.convert(make_tiny("llama", num_layers=2, seed=5), ck.CQILPlan([[0, 1]]), backend="torch")
    for draft in (plain_draft, converted_draft):
        assisted = model.generate(ids, assistant_model=draft, **kw)
        assert torch.equal(assisted, greedy)


# Every layer grouped: no layer calls its attention module by itself (assisted decoding raised
# IndexError here when groups recorded no attentions).
ALL_GROUPED = ck.CQILPlan([[0, 1], [2, 3]], bypass=0)


@pytest.mark.parametrize("plan", [PLAN, ALL_GROUPED], ids=["one-group", "all-grouped"])
def test_assisted_decoding_with_output_attentions(plan):
    model, _ = converted("llama", attn_implementation="eager", plan=plan)
    draft = make_tiny("llama", num_layers=2, seed=5, attn_implementation="eager")
    ids = prompt(batch=1)
    kw = gen_kwargs(6, force_length=False, do_sample=False)
    out = model.generate(ids, assistant_model=draft, return_dict_in_generate=True, output_attentions=True, **kw)
    assert torch.equal(out.sequences, model.generate(ids, **kw))
    # one entry per new token, each holding every layer's attention over the keys so far
    assert len(out.attentions) == out.sequences.shape[1] - ids.shape[1] >= 4
    for step in out.attentions:
        assert len(step) == NUM_LAYERS
        assert all(a.shape[:2] == (1, 4) for a in step)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_static_cache_generation_matches_dynamic_and_the_oracle(family):
    model, oracle = converted(family)
    ids = prompt()
    kw = gen_kwargs(5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    static = model.generate(ids, cache_implementation="static", **kw)
    dynamic = model.generate(ids, **kw)
    want = oracle.generate(ids, **kw)
    assert torch.equal(static.sequences, want.sequences)
    assert torch.equal(dynamic.sequences, want.sequences)
    for a, b in zip(static.logits, want.logits):
        assert_close(a, b, what="static-cache logits")


def test_generation_continues_from_returned_past_key_values():
    """Generate, append user tokens, continue with the returned cache: the same as generating
    from the whole text with a fresh cache."""
    model, oracle = converted("qwen2")
    ids = prompt(batch=1)
    kw = gen_kwargs(3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    first = model.generate(ids, **kw)
    follow_up = torch.cat([first.sequences, torch.tensor([[11, 12]])], dim=1)
    resumed = model.generate(follow_up, past_key_values=first.past_key_values, **kw)
    fresh = model.generate(follow_up, **kw)
    want = oracle.generate(follow_up, **kw)
    assert torch.equal(resumed.sequences, fresh.sequences)
    assert torch.equal(resumed.sequences, want.sequences)
    for a, b in zip(resumed.logits, want.logits):
        assert_close(a, b, what="resumed logits")


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_each_sequence_alone(family):
    model, _ = converted(family)
    ids, mask, rows = left_padded()
    batched = logits(model, ids, attention_mask=mask)[:, -1]
    kw = gen_kwargs(4, do_sample=False)
    batched_tokens = model.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1] :]
    for b, row in enumerate(rows):
        alone = logits(model, row[None])[:, -1]
        assert_close(batched[b : b + 1], alone, what=f"{family} row {b} last logits")
        assert torch.equal(batched_tokens[b], model.generate(row[None], **kw)[0, len(row) :])


# ---------------------------------------------------------------------------------- model outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_output_attentions_has_every_layers_probabilities(family):
    model, oracle = converted(family, attn_implementation="eager")
    ids, mask, _ = left_padded()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        want = oracle(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    B, T = ids.shape
    assert len(want) == NUM_LAYERS  # the oracle calls every layer's attention module
    assert len(got) == NUM_LAYERS
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == (B, 4, T, T), f"layer {i}: {tuple(a.shape)}"
        # probabilities: non-negative, each real (unpadded) query row sums to one
        rows = a.sum(-1)[mask.bool()[:, None, :].expand(B, 4, T)]
        assert (a >= 0).all()
        assert_close(rows, torch.ones_like(rows), what=f"layer {i} row sums")
        assert_close(a, b, what=f"{family} layer {i} attention probabilities")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_output_hidden_states_one_per_layer_plus_embeddings(family):
    model, oracle = converted(family)
    ids = prompt()
    with torch.no_grad():
        got = model(input_ids=ids, output_hidden_states=True).hidden_states
        want = oracle(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == NUM_LAYERS + 1
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == (2, 6, 48)
        assert_close(a, b, what=f"hidden state {i}")
    # a group's followers pass the group output through: layers 1..3 end where the group ends
    assert torch.equal(got[2], got[3])


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_and_sdpa_attention_agree(family):
    eager, oracle = converted(family, attn_implementation="eager")
    sdpa, _ = converted(family, attn_implementation="sdpa")
    ids, mask, _ = left_padded()
    want = logits(oracle, ids, attention_mask=mask)
    a = logits(eager, ids, attention_mask=mask)
    b = logits(sdpa, ids, attention_mask=mask)
    real = mask.bool()  # padded query rows are unspecified (fully masked)
    assert_close(a[real], want[real], what="eager")
    assert_close(b[real], want[real], what="sdpa")
    assert_close(a[real], b[real], what="eager vs sdpa")
    # switching the implementation of an already converted model takes effect
    sdpa.set_attn_implementation("eager")
    assert_close(logits(sdpa, ids, attention_mask=mask)[real], a[real], what="after set_attn_implementation")


# ---------------------------------------------------------------------------------- surgery, training


def test_resize_token_embeddings_keeps_the_group():
    model, _ = converted("mistral")
    ids = prompt()
    before = logits(model, ids)
    model.resize_token_embeddings(VOCAB + 7)
    assert model.config.vocab_size == VOCAB + 7
    assert ck.get_plan(model) == PLAN
    after = logits(model, ids)
    assert after.shape[-1] == VOCAB + 7
    # existing tokens' embeddings and output rows are untouched: their logits are unchanged
    assert_close(after[..., :VOCAB], before, atol=0, what="old-vocabulary logits")
    new_token = torch.tensor([[VOCAB + 3]])
    assert torch.isfinite(logits(model, torch.cat([ids[:1], new_token], 1))).all()
    assert_fused(model, ids)


def test_gradient_checkpointing_trains_every_layer():
    model, oracle = converted("qwen2")
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    model.train()
    oracle.train()
    ids = prompt()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    oracle(input_ids=ids, labels=ids).loss.backward()
    oracle_params = dict(oracle.named_parameters())
    for name, p in model.named_parameters():
        if ".layers." not in name:
            continue
        assert p.grad is not None, f"no gradient reached {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient at {name}"
        want = oracle_params[name].grad
        assert_close(p.grad, want, what=f"grad {name}")
    # and a step of an optimizer changes the output
    before = logits(model.eval(), ids)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert max_err(logits(model, ids), before) > 1e-4


def test_to_dtype_after_convert():
    model, oracle = converted("qwen3")
    ids = prompt()
    fp32 = logits(model, ids)
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    # HF normalises in fp32 even for fp64 models, the group's fused norms in fp64: ~1e-7 apart
    assert_close(logits(model, ids), logits(oracle.to(torch.float64), ids), atol=1e-6, what="fp64")
    assert_fused(model, ids)
    model.to(torch.float32)  # fp32 -> fp64 -> fp32 is exact: the first outputs again
    assert torch.equal(logits(model, ids), fp32)


# ---------------------------------------------------------------------------------- saving, loading


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_save_pretrained_then_load_both_ways(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = converted(family)
    ids = prompt()
    want = logits(model, ids)
    want_tokens = model.generate(ids, **gen_kwargs(4, do_sample=False))
    model.save_pretrained(tmp_path)
    loaded = ck.from_pretrained(tmp_path, backend="torch").eval()
    assert ck.get_plan(loaded) == PLAN
    assert torch.equal(logits(loaded, ids), want)
    assert torch.equal(loaded.generate(ids, **gen_kwargs(4, do_sample=False)), want_tokens)
    assert_fused(loaded, ids)
    plain = ck.convert(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), backend="torch")
    assert torch.equal(logits(plain, ids), want)


def _fresh_converted(family="llama"):
    """A converted model of the same shape with other weights: a target to load into."""
    return converted(family, seed=7)[0]


def _assert_complete(saved: dict, model):
    want = model.state_dict()
    missing = sorted(set(want) - set(saved))
    assert not missing, f"{len(missing)} of {len(want)} tensors not written, e.g. {missing[:3]}"
    for k, v in want.items():
        assert torch.equal(saved[k], v), f"{k} written with other values"


def test_torch_save_state_dict_round_trip(tmp_path):
    model, _ = converted("llama")
    ids = prompt()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    saved = torch.load(tmp_path / "sd.pt", weights_only=True)
    _assert_complete(saved, model)
    target = _fresh_converted()
    target.load_state_dict(saved)
    assert torch.equal(logits(target, ids), logits(model, ids))


def test_safetensors_save_model_round_trip(tmp_path):
    from safetensors.torch import load_file, load_model, save_model

    model, _ = converted("qwen2")
    ids = prompt()
    save_model(model, str(tmp_path / "m.safetensors"))
    _assert_complete(load_file(str(tmp_path / "m.safetensors")), model)
    target = _fresh_converted("qwen2")
    load_model(target, str(tmp_path / "m.safetensors"))
    assert torch.equal(logits(target, ids), logits(model, ids))


def test_accelerate_save_model_writes_every_weight(tmp_path):
    from accelerate import Accelerator
    from safetensors.torch import load_file

    model, _ = converted("llama")
    ids = prompt()
    Accelerator(cpu=True).save_model(model, tmp_path)
    saved = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        saved.update(load_file(str(f)))
    _assert_complete(saved, model)
    target = _fresh_converted()
    target.load_state_dict(saved)
    assert torch.equal(logits(target, ids), logits(model, ids))


def test_peft_save_pretrained_round_trip(tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = converted("llama")
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    wrapped.eval()
    ids = prompt()
    want = logits(wrapped, ids)
    wrapped.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    adapters = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(adapters) == 2 * 4 * NUM_LAYERS  # lora_A and lora_B of 4 targets in every layer
    base = _fresh_converted()
    base.load_state_dict(base_sd)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.equal(logits(reloaded, ids), want)
    with reloaded.disable_adapter():
        assert max_err(logits(reloaded, ids), want) > 1e-3  # the adapters matter


def test_deepcopy_after_a_forward():
    model, _ = converted("qwen3")
    ids = prompt()
    want = logits(model, ids)
    clone = copy.deepcopy(model)
    assert torch.equal(logits(clone, ids), want)
    assert_fused(clone, ids)
    # the copy computes from its own weights
    with torch.no_grad():
        clone.model.layers[2].mlp.down_proj.weight.mul_(2)
    assert max_err(logits(clone, ids), want) > 1e-3
    assert torch.equal(logits(model, ids), want)


def test_torch_save_whole_model(tmp_path):
    model, _ = converted("llama")
    ids = prompt()
    want = logits(model, ids)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert ck.get_plan(loaded) == PLAN
    assert torch.equal(logits(loaded, ids), want)
    assert_fused(loaded, ids)


def test_load_state_dict_assign_keeps_the_fused_path():
    model, _ = converted("llama")
    donor = make_tiny("llama", num_layers=NUM_LAYERS, seed=3)
    want = logits(reference_model(donor, PLAN.groups, PLAN.bypass), prompt())
    model.load_state_dict({k: v.clone() for k, v in donor.state_dict().items()}, assign=True)
    ids = prompt()
    assert_close(logits(model, ids), want, what="after assign=True")
    assert_fused(model, ids)


def test_plain_load_state_dict_keeps_the_fused_path():
    """The counterpart of the assign=True test that works today: the spy itself is sound."""
    model, _ = converted("llama")
    donor = make_tiny("llama", num_layers=NUM_LAYERS, seed=3)
    model.load_state_dict(donor.state_dict())
    ids = prompt()
    assert_close(logits(model, ids), logits(reference_model(donor, PLAN.groups, PLAN.bypass), ids))
    assert_fused(model, ids)
