"""What conversion keeps: layer list, state-dict keys, one copy of the weights, PEFT, save/load."""

from __future__ import annotations

import pytest
import torch
from reference_group import patch_reference, reference_model
from tiny_models import make_tiny
from transformers import AutoModelForCausalLM

import cqil_kernels as ck
from cqil_kernels.conversion import decoder_layers

PLAN = ck.CQILPlan([[1, 2], [3, 4, 5]], bypass=1)


def storage_bytes(model) -> int:
    """Bytes of distinct parameter storages (shared storages counted once)."""
    seen = {}
    for p in model.parameters():
        s = p.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (2, 8), generator=g)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_layers_keys_and_memory_are_kept(family):
    model = make_tiny(family, num_layers=6)
    keys = list(model.state_dict().keys())
    n_layers = len(model.model.layers)
    nbytes = storage_bytes(model)
    params_before = {n: p for n, p in model.named_parameters()}
    ck.convert(model, PLAN, backend="torch")
    assert len(model.model.layers) == n_layers
    assert list(model.state_dict().keys()) == keys
    # the same Parameter objects with their own storage: nothing copied, nothing aliased
    ptrs_before = {n: p.data_ptr() for n, p in params_before.items()}
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs_before
    assert storage_bytes(model) == nbytes
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages), "a parameter shares storage with another"
    # and the group's kernels read exactly those tensors
    layer = model.model.layers[3]
    with torch.no_grad():
        weights, why = layer._cqil_group.fused_weights()
    assert why is None and weights.qkv[3] is model.model.layers[4].self_attn.q_proj.weight


def test_load_state_dict_writes_through_to_the_group():
    model = make_tiny("llama", num_layers=6)
    donor = make_tiny("llama", num_layers=6, seed=3)
    ck.convert(model, PLAN, backend="torch")
    model.load_state_dict(donor.state_dict())
    ref = reference_model(donor, PLAN.groups, PLAN.bypass)
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=2e-4, rtol=0)


def test_dtype_change_after_conversion_is_picked_up():
    model = make_tiny("qwen2", num_layers=6)
    ref = reference_model(model, PLAN.groups, PLAN.bypass).double()
    ck.convert(model, PLAN, backend="torch")
    model.double()
    ids = batch()
    with torch.no_grad():
        out = model(ids).logits
        # HF normalises in fp32 even for fp64 models, the fused references in fp64: 1e-6 apart
        torch.testing.assert_close(out, ref(ids).logits, atol=1e-6, rtol=0)
    with torch.no_grad():
        weights, why = model.model.layers[1]._cqil_group.fused_weights()
    assert why is None and all(t.dtype == torch.float64 for t in weights.tensors())


def test_peft_lora_targets_and_outputs():
    peft = pytest.importorskip("peft")
    model = make_tiny("llama", num_layers=6)
    ck.convert(model, PLAN, backend="torch")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], lora_dropout=0.0)
    pm = peft.get_peft_model(model, cfg)
    # PEFT found every target by its original name
    names = [n for n, _ in pm.named_modules() if n.endswith("lora_A")]
    assert len(names) == 6 * 4
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    pm.eval()
    # oracle: the same LoRA model, CQIL removed, then the independent group semantics patched in
    import copy

    oracle = copy.deepcopy(pm)
    base = oracle.base_model.model
    ck.revert(base)
    patch_reference(base, PLAN.groups, PLAN.bypass)
    ids = batch()
    with torch.no_grad():
        got = pm(input_ids=ids).logits
        want = oracle(input_ids=ids).logits
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
        # and LoRA matters (the group did not silently run the base weights)
        with pm.disable_adapter():
            plain = pm(input_ids=ids).logits
    assert (plain - got).abs().max() > 1e-2


def test_gradients_reach_the_layer_parameters():
    model = make_tiny("llama", num_layers=6)
    ck.convert(model, PLAN, backend="torch")
    model.train()
    model(batch(), labels=batch()).loss.backward()
    w = model.model.layers[2].mlp.down_proj.weight
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_save_and_reload_restores_the_converted_model(tmp_path):
    model = make_tiny("qwen3", num_layers=6)
    ck.convert(model, PLAN, backend="torch")
    model.save_pretrained(tmp_path)
    ids = batch()
    with torch.no_grad():
        want = model(ids).logits
    loaded = ck.from_pretrained(tmp_path, backend="torch")
    assert ck.get_plan(loaded) == PLAN
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, atol=0, rtol=0)
    # the plain transformers loader plus convert() reading the config works too
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    ck.convert(plain, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids).logits, want, atol=0, rtol=0)


def test_plan_from_dict_and_base_model():
    model = make_tiny("mistral", num_layers=6)
    base = model.model  # a MistralModel: converts too
    ck.convert(base, {"groups": [[2, 3]], "bypass": 0}, backend="torch")
    assert ck.is_converted(model) and len(decoder_layers(base)) == 6


def test_conversion_inside_inference_mode_leaves_trainable_parameters():
    """Stacking under torch.inference_mode must not turn parameters into inference tensors."""
    model = make_tiny("llama", num_layers=6)
    with torch.inference_mode():
        ck.convert(model, PLAN, backend="torch")
        model(batch())
    ck.revert(model)
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    model(batch(), labels=batch()).loss.backward()
    assert model.model.layers[1].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_family_takes_the_fused_path(family):
    """A plain converted model runs its groups on the kernels, not the modules fallback (which
    would be correct but silently slow)."""
    model = make_tiny(family, num_layers=6)
    ck.convert(model, PLAN, backend="torch")
    with torch.no_grad():
        for i in (1, 3):
            weights, why = model.model.layers[i]._cqil_group.fused_weights()
            assert why is None, why
    assert "gradients" in model.model.layers[1]._cqil_group.fused_weights()[1]  # grad enabled: the modules
