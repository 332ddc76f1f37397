"""CQILDecoderGroup: the public module form of a group, in model code written by hand."""

import pytest
import torch

import cqil_kernels as ck
from distributed_harness import run_ranks
from reference_group import reference_model
from tiny_models import make_tiny, new_cache

GROUP = [2, 3]


def _forward_with_module(model, group_module, ids, cache=None):
    """The model's own loop with layers 2..3 replaced by one CQILDecoderGroup call."""
    inner = model.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    pe = inner.rotary_emb(h, pos)
    from transformers.masking_utils import create_causal_mask

    mask = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=torch.ones_like(ids),
                              past_key_values=cache, position_ids=pos)
    for i, layer in enumerate(inner.layers):
        if i == GROUP[0]:
            h = group_module(h, position_embeddings=pe, attention_mask=mask, past_key_values=cache)
        elif i not in GROUP:
            h = layer(h, attention_mask=mask, position_embeddings=pe, past_key_values=cache, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
    return model.lm_head(inner.norm(h))


@pytest.mark.parametrize("family,bypass", [("llama", 0), ("qwen3", 1)])
def test_module_computes_the_group_semantics(family, bypass):
    model = make_tiny(family, num_layers=5)
    ref = reference_model(model, [GROUP], bypass)
    group = ck.CQILDecoderGroup([model.model.layers[i] for i in GROUP], bypass=bypass, backend="torch")
    assert [id(m) for m in group.layers] == [id(model.model.layers[i]) for i in GROUP]
    ids = torch.randint(3, 90, (2, 6))
    with torch.no_grad():
        got = _forward_with_module(model, group, ids, cache=new_cache(model, "dynamic", 8))
        want = ref(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_module_refuses_bad_groups():
    model = make_tiny("llama", num_layers=5)
    layers = model.model.layers
    with pytest.raises(ValueError, match="not consecutive"):
        ck.CQILDecoderGroup([layers[1], layers[3]])
    with pytest.raises(ValueError, match="bypass"):
        ck.CQILDecoderGroup([layers[1], layers[2]], bypass=2)


def _rank_module(ctx):
    model = make_tiny("llama", num_layers=5)
    group = ck.CQILDecoderGroup([model.model.layers[i] for i in GROUP], bypass=1, backend="torch",
                                process_group=ctx.group)
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = _forward_with_module(model, group, ids, cache=new_cache(model, "dynamic", 8))
    return {"logits": out.tolist(), "held": [m.self_attn.layer_idx for m in group.layers]}


def test_module_split_over_two_ranks():
    model = make_tiny("llama", num_layers=5)
    ref = reference_model(model, [GROUP], 1)
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits
    outs = run_ranks(_rank_module, 2, pg_timeout=30.0, join_timeout=120.0)
    assert [o["held"] for o in outs] == [[2], [3]]
    for o in outs:
        torch.testing.assert_close(torch.tensor(o["logits"]), want, atol=2e-5, rtol=0)
