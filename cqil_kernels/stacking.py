"""Stacked weight buffers of a CQIL group, with the layers' parameters turned into views.

A group's grouped GEMMs want each weight family of its P layers in one buffer. Copying would
double the memory, so the buffers are built once and every original ``nn.Parameter`` is re-pointed
(``param.data = view``) at its slice: parameter objects, names and state-dict keys stay the same,
``load_state_dict`` writes through into the buffers, and no second copy exists.

Layouts (P layers; N = (nh + 2*nkv) * D; I = MLP width; H = hidden):

=================  =================  ==========================================================
buffer             shape              layer j's parameters
=================  =================  ==========================================================
qkv_weight         [P*N, H]           q/k/v_proj.weight = rows jN .. jN+N (q, then k, then v)
qkv_bias           [P*N] or None      q/k/v_proj.bias (Qwen2)
o_weight           [P, H, nh*D]       o_proj.weight = o_weight[j]
gate_up_weight     [P, 2I, H]         gate_proj.weight = [j, :I], up_proj.weight = [j, I:]
down_weight        [P, H, I]          down_proj.weight = down_weight[j]
input_norm         [P, H]             input_layernorm.weight
post_norm          [P, H]             post_attention_layernorm.weight
q_norm, k_norm     [P, D] or None     self_attn.q_norm / k_norm.weight (Qwen3)
=================  =================  ==========================================================

Anything that re-allocates parameters (``model.to(dtype)``, ``.cuda()``, ``load_state_dict(...,
assign=True)``) breaks the aliasing; ``is_fresh()`` notices and ``build()`` restacks from the
current parameters. A module replaced by a wrapper (PEFT's LoRA) makes ``modules_intact()`` false:
the group then runs through the layers' own modules instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["StackedWeights", "stackable_reason"]


@dataclass
class _Alias:
    parent: nn.Module  # the module holding ``module`` as attribute ``child``
    child: str
    module: nn.Module
    param_name: str
    param: nn.Parameter
    view: torch.Tensor


def _linear(mod) -> bool:
    # Exactly nn.Linear: subclasses and wrappers (quantized, LoRA) have other forward math.
    return type(mod) is nn.Linear


def stackable_reason(layers) -> str | None:
    """Why the layers' weights cannot be stacked, or None if they can.

    Not stackable is not an error: the group then runs through the layers' own modules.
    """
    first = layers[0]
    for idx, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        for owner, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                mod = getattr(owner, n, None)
                if not _linear(mod):
                    return f"layer {idx} {n} is {type(mod).__name__}, not nn.Linear"
                if mod.weight.device.type == "meta":
                    return f"layer {idx} {n} is on the meta device"
        if attn.o_proj.bias is not None or any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
            return "o_proj or MLP biases are not supported by the stacked path"
        if (attn.q_proj.bias is None) != (attn.k_proj.bias is None) or (attn.q_proj.bias is None) != (attn.v_proj.bias is None):
            return "q/k/v biases present on some projections only"
        ref_params = dict(first.named_parameters())
        for name, p in layer.named_parameters():
            q = ref_params.get(name)
            if q is None or q.shape != p.shape or q.dtype != p.dtype or q.device != p.device:
                return f"layer {idx} parameter {name} differs in shape, dtype or device from the group's first layer"
    return None


class StackedWeights:
    """The stacked buffers of one group (see the module docstring for layouts)."""

    def __init__(self, layers, qk_norm: bool):
        self.layers = list(layers)
        self.qk_norm = qk_norm
        self.aliases: list[_Alias] = []
        self.build()

    # ------------------------------------------------------------------ building
    def build(self) -> None:
        """(Re)build every buffer from the layers' current parameters and re-point them."""
        layers = self.layers
        P = len(layers)
        attn0, mlp0 = layers[0].self_attn, layers[0].mlp
        ref = attn0.q_proj.weight
        dev, dt = ref.device, ref.dtype
        H = attn0.q_proj.in_features
        nq, nk, nv = attn0.q_proj.out_features, attn0.k_proj.out_features, attn0.v_proj.out_features
        N = nq + nk + nv
        I = mlp0.gate_proj.out_features
        self.sizes = {"H": H, "N": N, "q": nq, "k": nk, "v": nv, "I": I, "P": P}

        new_aliases: list[_Alias] = []

        def point(parent, child, param_name, view):
            module = getattr(parent, child)
            param = getattr(module, param_name)
            with torch.no_grad():
                view.copy_(param.detach())
            param.data = view  # the Parameter object stays; its storage becomes the buffer's slice
            new_aliases.append(_Alias(parent, child, module, param_name, param, view))

        # inference_mode(False): a (re)stack can happen inside an inference_mode forward, and
        # parameters re-pointed at inference tensors could never be trained again.
        with torch.inference_mode(False), torch.no_grad():
            self.qkv_weight = torch.empty(P * N, H, device=dev, dtype=dt)
            has_bias = attn0.q_proj.bias is not None
            self.qkv_bias = torch.empty(P * N, device=dev, dtype=dt) if has_bias else None
            self.o_weight = torch.empty(P, H, attn0.o_proj.in_features, device=dev, dtype=dt)
            self.gate_up_weight = torch.empty(P, 2 * I, H, device=dev, dtype=dt)
            self.down_weight = torch.empty(P, H, I, device=dev, dtype=dt)
            norm_dt = layers[0].input_layernorm.weight.dtype
            self.input_norm = torch.empty(P, H, device=dev, dtype=norm_dt)
            self.post_norm = torch.empty(P, H, device=dev, dtype=norm_dt)
            if self.qk_norm:
                D = attn0.q_norm.weight.shape[0]
                self.q_norm = torch.empty(P, D, device=dev, dtype=attn0.q_norm.weight.dtype)
                self.k_norm = torch.empty(P, D, device=dev, dtype=attn0.k_norm.weight.dtype)
            else:
                self.q_norm = self.k_norm = None

            for j, layer in enumerate(layers):
                attn, mlp = layer.self_attn, layer.mlp
                base = j * N
                for name, lo, hi in (("q_proj", 0, nq), ("k_proj", nq, nq + nk), ("v_proj", nq + nk, N)):
                    point(attn, name, "weight", self.qkv_weight[base + lo : base + hi])
                    if has_bias:
                        point(attn, name, "bias", self.qkv_bias[base + lo : base + hi])
                point(attn, "o_proj", "weight", self.o_weight[j])
                point(mlp, "gate_proj", "weight", self.gate_up_weight[j, :I])
                point(mlp, "up_proj", "weight", self.gate_up_weight[j, I:])
                point(mlp, "down_proj", "weight", self.down_weight[j])
                point(layer, "input_layernorm", "weight", self.input_norm[j])
                point(layer, "post_attention_layernorm", "weight", self.post_norm[j])
                if self.qk_norm:
                    point(attn, "q_norm", "weight", self.q_norm[j])
                    point(attn, "k_norm", "weight", self.k_norm[j])
        self.aliases = new_aliases
        self._valid = True

    def invalidate(self) -> None:
        """Drop the buffers (after ``model.to(...)``): the next is_fresh() is False."""
        self._valid = False
        self.qkv_weight = self.qkv_bias = self.o_weight = self.gate_up_weight = None
        self.down_weight = self.input_norm = self.post_norm = self.q_norm = self.k_norm = None

    # ------------------------------------------------------------------ checks
    def modules_intact(self) -> bool:
        """The layers still hold the very modules and Parameter objects that were stacked."""
        for a in self.aliases:
            if getattr(a.parent, a.child, None) is not a.module or getattr(a.module, a.param_name, None) is not a.param:
                return False
        return True

    def is_fresh(self) -> bool:
        """Every parameter still aliases its slice of the buffers."""
        if not self._valid:
            return False
        for a in self.aliases:
            p, v = a.param, a.view
            if p.data_ptr() != v.data_ptr() or p.dtype != v.dtype or p.device != v.device or p.shape != v.shape:
                return False
        return True

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.qkv_weight, self.qkv_bias, self.o_weight, self.gate_up_weight, self.down_weight,
                            self.input_norm, self.post_norm, self.q_norm, self.k_norm) if t is not None]
