"""The weights a group's fused kernels read: each layer's own parameters, by reference.

A CQIL group's grouped GEMMs read one weight family (q/k/v, o_proj, gate, up, down, the norms) of
its P layers per launch. Nothing is stacked or copied for that: the kernels take the P layers'
own tensors as a list and find each through a small offset table (``ops._tables``). So no
parameter aliases another, every saver (``save_pretrained``, ``torch.save(state_dict)``,
safetensors, accelerate, PEFT) sees ordinary tensors, and nothing needs restacking when
parameters are re-allocated (``model.to()``, ``load_state_dict(assign=True)``): the lists are
gathered from the modules when they are used.

The fused path needs the layers to be plain: exactly ``nn.Linear`` projections (a PEFT LoRA
wrapper or a quantized linear has other forward math), no o_proj/MLP biases, and every weight
family of one layout (shape, strides, dtype, device) across the group. Otherwise the group runs
through the layers' own modules, which is slower but computes the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LayerWeights", "gather_weights"]

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LayerWeights:
    """Per-layer weight lists of a run of P layers, in layer order (shapes for hidden H, heads
    nh, kv heads nkv, head dim D, MLP width I).

    ``qkv`` is layer-major with three entries per layer (q [nh*D, H], k [nkv*D, H], v [nkv*D, H]);
    every other list has one entry per layer: ``o`` [H, nh*D], ``gate``/``up`` [I, H], ``down``
    [H, I], ``input_norm``/``post_norm`` [H], ``q_norm``/``k_norm`` [D] (Qwen3, else None);
    ``qkv_bias`` (Qwen2) follows ``qkv``'s order, else None.
    """

    input_norm: list
    qkv: list
    qkv_bias: list | None
    o: list
    post_norm: list
    gate: list
    up: list
    down: list
    q_norm: list | None
    k_norm: list | None

    def tensors(self) -> list[torch.Tensor]:
        out = []
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value is not None:
                out.extend(value)
        return out

    def fingerprint(self) -> tuple:
        """Addresses, dtypes and shapes of every tensor: equal fingerprints mean the same memory
        (a captured CUDA graph that read these weights is still valid)."""
        return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in self.tensors())


def _one_layout(tensors) -> bool:
    t0 = tensors[0]
    return all(t.shape == t0.shape and t.stride() == t0.stride() and t.dtype == t0.dtype and t.device == t0.device
               for t in tensors)


def gather_weights(layers, qk_norm: bool) -> tuple[LayerWeights | None, str | None]:
    """The layers' current weights for the fused kernels, or (None, why not).

    Not fusable is not an error: the caller then runs the layers' own modules.
    """
    qkv, qkv_bias, o, gate, up, down, inorm, pnorm, qn, kn = [], [], [], [], [], [], [], [], [], []
    for idx, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        mods = [getattr(attn, n, None) for n in _ATTN] + [getattr(mlp, n, None) for n in _MLP]
        for name, mod in zip(_ATTN + _MLP, mods):
            # exactly nn.Linear: subclasses and wrappers (quantized, LoRA) have other forward math
            if type(mod) is not nn.Linear:
                return None, f"layer {idx} {name} is {type(mod).__name__}, not nn.Linear"
        q, k, v, op, g, u, d = mods
        if q.weight.device.type == "meta":
            return None, f"layer {idx} is on the meta device"
        if op.bias is not None or g.bias is not None or u.bias is not None or d.bias is not None:
            return None, "o_proj or MLP biases are not supported by the fused kernels"
        biases = (q.bias, k.bias, v.bias)
        if any(b is None for b in biases) != all(b is None for b in biases):
            return None, "q/k/v biases present on some projections only"
        qkv += [q.weight, k.weight, v.weight]
        if biases[0] is not None:
            qkv_bias += list(biases)
        o.append(op.weight)
        gate.append(g.weight)
        up.append(u.weight)
        down.append(d.weight)
        for norms, mod in ((inorm, layer.input_layernorm), (pnorm, layer.post_attention_layernorm)):
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor):
                return None, f"layer {idx} {type(mod).__name__} has no weight tensor"
            norms.append(w)
        if qk_norm:
            qn.append(attn.q_norm.weight)
            kn.append(attn.k_norm.weight)
    if qkv_bias and len(qkv_bias) != len(qkv):
        return None, "q/k/v biases present in some layers only"
    families = {"q_proj": qkv[0::3], "k_proj": qkv[1::3], "v_proj": qkv[2::3], "o_proj": o, "gate_proj": gate,
                "up_proj": up, "down_proj": down, "input_layernorm": inorm, "post_attention_layernorm": pnorm}
    if qkv_bias:
        families.update({"q_proj bias": qkv_bias[0::3], "k_proj bias": qkv_bias[1::3], "v_proj bias": qkv_bias[2::3]})
    if qk_norm:
        families.update(q_norm=qn, k_norm=kn)
    for name, ts in families.items():
        if not _one_layout(ts):
            return None, f"the layers' {name} weights differ in shape, strides, dtype or device"
    dt, dev = qkv[0].dtype, qkv[0].device
    if (any(t.dtype != dt or t.device != dev for t in (o[0], gate[0], up[0], down[0]))
            or gate[0].stride() != up[0].stride() or len({t.stride() for t in qkv[:3]}) > 1):
        return None, "the projection weights differ in dtype, device or layout"
    weights = LayerWeights(
        input_norm=inorm, qkv=qkv, qkv_bias=qkv_bias or None, o=o, post_norm=pnorm, gate=gate, up=up, down=down,
        q_norm=qn if qk_norm else None, k_norm=kn if qk_norm else None,
    )
    return weights, None
