"""An independent oracle for CQIL group semantics, written against transformers' own modules.

``reference_model(model, plan)`` deep-copies an unconverted model and replaces the forward of the
layers in each group: the leader calls the original layer objects on the shared input and sums
their deltas (d = 0: whole original layers; d > 0: the layers' own attention and MLP modules, with
the bypass added from the attention outputs); followers pass through. It shares no code with
cqil_kernels' group implementation, stacking or backends.
"""

from __future__ import annotations

import copy
import types

import torch


def _leader_forward(layers, bypass):
    base_forwards = [type(layer).forward for layer in layers]

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        h = hidden_states
        if bypass == 0:
            out = h
            for layer, fwd in zip(layers, base_forwards):
                y = fwd(layer, h, attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs)
                y = y[0] if isinstance(y, tuple) else y
                out = out + (y - h)
            return out
        attn_kwargs = {k: v for k, v in kwargs.items() if k != "use_cache"}
        attn_outs = []
        for layer in layers:
            a, _ = layer.self_attn(
                hidden_states=layer.input_layernorm(h),
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                **attn_kwargs,
            )
            attn_outs.append(a)
        out = h
        for j, layer in enumerate(layers):
            b = sum((attn_outs[j - i] for i in range(1, min(bypass, j) + 1)), torch.zeros_like(h))
            m = layer.mlp(layer.post_attention_layernorm(h + attn_outs[j] + b))
            out = out + attn_outs[j] + m
        return out

    return forward


def _follower_forward(self, hidden_states, *args, **kwargs):
    return hidden_states


def _per_group(groups, bypass):
    """``bypass``: one int for every group, or a sequence with one int per group."""
    if isinstance(bypass, int):
        return [bypass] * len(groups)
    bypass = list(bypass)
    assert len(bypass) == len(groups), "one bypass per group"
    return bypass


def patch_reference(model, groups, bypass):
    """Patch ``model`` (unconverted) in place to compute the CQIL semantics; returns it.

    ``bypass``: one int for every group, or one int per group.
    """
    layers = model.model.layers
    for group, d in zip(groups, _per_group(groups, bypass)):
        if len(group) < 2:
            continue
        members = [layers[i] for i in group]
        members[0].forward = types.MethodType(_leader_forward(members, d), members[0])
        for layer in members[1:]:
            layer.forward = types.MethodType(_follower_forward, layer)
    return model


def reference_model(model, groups, bypass):
    """A deep copy of the unconverted ``model`` computing ``groups`` with ``bypass`` (one int, or
    one per group) (oracle)."""
    return patch_reference(copy.deepcopy(model), groups, bypass)
