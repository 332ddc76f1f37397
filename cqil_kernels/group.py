"""One CQIL group: P adjacent decoder layers computed from one shared input.

Semantics (design.md section 1), for group input h and bypass distance d:

    a_j   = Attn_j(RMSNorm_in_j(h))
    b_j   = sum_{i=1..min(d, j)} a_{j-i}
    m_j   = MLP_j(RMSNorm_post_j(h + a_j + b_j))
    h_out = h + sum_j (a_j + m_j)

A group runs in two stages, the same for every caller (transformers' forward, the decode engine's
prefill and decode steps):

1. an *attention stage* ``attend(group, x, fused) -> a [P, M, H]``: each layer's attention output
   after its o_proj. Callers differ only here (how q/k/v reach a cache and which attention
   kernel runs): transformers' cache objects and attention functions; the engine's static cache
   with SDPA (prefill) or the fused QKV + RoPE + cache kernel and split-KV decode (decode); or
   the layers' own attention modules (when transformers records attention weights);
2. :meth:`CQILGroup.mlp_stage`: the bypass, each layer's post-norm + gate/up with SiLU*up fused,
   and one down-projection GEMM over the K-concatenation of the layers, whose K reduction is the
   sum over layers, with the residual and the attention outputs added in its epilogue.

Two ways to run the projections, same math:
- fused: the grouped kernels of a backend's op set read each layer's own weight tensors (lists,
  see ``weights.py``): nothing is stacked, copied or aliased;
- modules: each layer's own modules are called (when a module was wrapped, e.g. by PEFT's LoRA,
  when gradients must reach the parameters, or when the weights cannot run the kernels).
"""

from __future__ import annotations

import sys

import torch

from . import compat
from .families import Family, sliding_window_of
from .weights import LayerWeights, gather_weights

__all__ = ["CQILGroup"]


def _rotary_fn(layer):
    """The family's own ``apply_rotary_pos_emb`` (same numerics as the original layer)."""
    base = getattr(layer, "_cqil_base_class", type(layer))
    attn_cls = type(layer.self_attn)
    for cls in (attn_cls, base):
        fn = getattr(sys.modules[cls.__module__], "apply_rotary_pos_emb", None)
        if fn is not None:
            return fn
    raise TypeError(f"{base.__name__}: cannot find apply_rotary_pos_emb in {base.__module__}")


def _attention_fn(attn):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = attn.config._attn_implementation
    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward")
    if impl in (None, "eager"):
        return eager
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    return ALL_ATTENTION_FUNCTIONS[impl]


class CQILGroup:
    """A group of P consecutive decoder layers of one model (not an nn.Module on purpose:
    registering it would add state-dict keys and move the layers under a new parent).

    Holds references to the layers only (no tensors of its own), so it survives ``model.to()``,
    ``load_state_dict(assign=True)``, ``copy.deepcopy`` and pickling unchanged.

    Args:
        layers: the P decoder layer modules, in order.
        indices: their indices in ``model.model.layers``.
        bypass: the distance d, 0 <= d <= P-1.
        family: the model family row from ``families.FAMILIES``.
        backend: "torch" or "triton": which op set the fused path uses.
    """

    def __init__(self, layers, indices, bypass: int, family: Family, backend: str):
        self.layers = list(layers)
        self.indices = tuple(indices)
        self.bypass = int(bypass)
        self.family = family
        self.backend = backend
        attn0 = self.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.num_heads = attn0.q_proj.out_features // self.head_dim
        self.num_kv_heads = attn0.k_proj.out_features // self.head_dim
        self.rotary = _rotary_fn(self.layers[0])

    @property
    def size(self) -> int:
        return len(self.layers)

    # ------------------------------------------------------------------ path choice
    def fused_weights(self) -> tuple[LayerWeights | None, str | None]:
        """The layers' weights for the fused kernels now, or (None, why the modules must run)."""
        if torch.is_grad_enabled() and any(p.requires_grad for layer in self.layers for p in layer.parameters()):
            # custom ops have no autograd formula: gradients must flow through the modules
            return None, "gradients are enabled for the layers' parameters"
        return gather_weights(self.layers, self.family.qk_norm)

    def ops(self):
        from .backends import get_ops

        return get_ops(self.backend)

    # ------------------------------------------------------------------ transformers' interface
    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_embeddings=None, **kwargs) -> torch.Tensor:
        """hidden_states [B, T, H] -> group output [B, T, H] (transformers' layer interface)."""
        cache = compat.pop_cache(kwargs)
        kwargs.pop("use_cache", None)
        output_attentions = kwargs.pop("output_attentions", None)
        cache_position = kwargs.pop("cache_position", None)
        if position_embeddings is None:
            raise ValueError("CQIL groups need position_embeddings from the model (transformers >= 4.48)")
        B, T, H = hidden_states.shape
        x = hidden_states.reshape(B * T, H)
        if compat.attentions_requested(output_attentions):
            # transformers records attention weights with hooks on the attention modules: run them
            attend = _ModuleAttention(B, T, attention_mask, position_embeddings, cache, cache_position, output_attentions,
                                      kwargs)
        else:
            attend = _HFAttention(B, T, attention_mask, position_embeddings, cache, cache_position, kwargs)
        return self.run(x, attend).view(B, T, H)

    # ------------------------------------------------------------------ the stages
    def run(self, x: torch.Tensor, attend, ops=None) -> torch.Tensor:
        """The group on x [M, H] -> h_out [M, H]: ``attend(group, x, weights, ops)`` gives the
        attention outputs [P, M, H] (after o_proj; ``weights`` is None on the modules path), then
        :meth:`mlp_stage`. ``ops``: the op set of the fused path (default: this group's backend;
        the decode engine passes its own)."""
        ops = ops or self.ops()
        weights, _ = self.fused_weights()
        a = attend(self, x, weights, ops)
        return self.mlp_stage(x, a, weights, ops)

    def project_qkv(self, x: torch.Tensor, weights: LayerWeights | None, ops):
        """Shared input x [M, H] -> q [M, P, nh, D], k and v [M, P, nkv, D] (Qwen3 q/k norm applied).

        Steps 1-2 of the decomposition: one GEMM over the N-concatenated q/k/v weights of the P
        layers, each layer's input RMSNorm weight applied to the once-normalised input.
        """
        M = x.shape[0]
        P, nh, nkv, D = self.size, self.num_heads, self.num_kv_heads, self.head_dim
        if weights is not None:
            qkv = ops.qkv_gemm(x, weights.input_norm, weights.qkv, weights.qkv_bias, self._eps("input_layernorm"))
            q, k, v = qkv.view(M, P, (nh + 2 * nkv) * D).split([nh * D, nkv * D, nkv * D], dim=-1)
        else:
            parts = []
            for layer in self.layers:
                xn = layer.input_layernorm(x)
                a = layer.self_attn
                parts.append((a.q_proj(xn), a.k_proj(xn), a.v_proj(xn)))
            q, k, v = (torch.stack([p[i] for p in parts], dim=1) for i in range(3))
        q = q.reshape(M, P, nh, D)
        k = k.reshape(M, P, nkv, D)
        v = v.reshape(M, P, nkv, D)
        if self.family.qk_norm:
            q, k = self._qk_norm(q, k, weights, ops)
        return q, k, v

    def qkv_rope_cache(self, x, weights: LayerWeights, ops, cos, sin, k_cache, v_cache, slot, tokens_per_seq: int,
                       cache_layer0: int | None = None):
        """Static-cache form of steps 1-3 (decode engine; fused path only): x [M, H] -> rotated
        q [M, P*nh, D]; each layer's k (normed for Qwen3, rotated) and v written into the
        [L, B, nkv, S, D] caches at layer ``cache_layer0 + j`` (default: the layer's own index)
        and slots ``slot[0] + t``. cos/sin: [M, D] (full-width rotary). Two kernels with the
        Triton op set."""
        qk_eps = float(self.layers[0].self_attn.q_norm.variance_epsilon) if self.family.qk_norm else 0.0
        layer0 = self.indices[0] if cache_layer0 is None else cache_layer0
        return ops.qkv_rope_cache(
            x, weights.input_norm, weights.qkv, weights.qkv_bias, self._eps("input_layernorm"), cos, sin,
            weights.q_norm, weights.k_norm, qk_eps, k_cache, v_cache, layer0, slot, tokens_per_seq, self.num_heads,
        )

    def heads_first(self, q, k, v, B: int, T: int):
        """[B*T, P, heads, D] -> [B, P*heads, T, D]: the group's heads as one attention's heads."""
        P, nh, nkv, D = self.size, self.num_heads, self.num_kv_heads, self.head_dim
        q = q.reshape(B, T, P * nh, D).transpose(1, 2)
        k = k.reshape(B, T, P * nkv, D).transpose(1, 2)
        v = v.reshape(B, T, P * nkv, D).transpose(1, 2)
        return q, k, v

    def o_proj(self, attn_heads: torch.Tensor, weights: LayerWeights | None, ops) -> torch.Tensor:
        """Attention outputs before o_proj [P, M, nh*D] (strided views are fine) -> a [P, M, H]
        (step 5: one batched GEMM, each layer its own weight)."""
        if weights is not None:
            return ops.batched_gemm(attn_heads, weights.o, None)
        return torch.stack([layer.self_attn.o_proj(attn_heads[j]) for j, layer in enumerate(self.layers)])

    def mlp_stage(self, x: torch.Tensor, a: torch.Tensor, weights: LayerWeights | None, ops) -> torch.Tensor:
        """x [M, H] and attention outputs a [P, M, H] -> group output [M, H].

        Steps 6-7: the bypass (layer j's MLP input also gets the d attention outputs before it),
        per-layer post-norm + gate/up with SiLU*up fused, and one down-projection GEMM over the
        K-concatenation whose K reduction is the sum over layers, with the residual and the
        attention outputs added in its epilogue.
        """
        if weights is not None:
            # gate_up_silu forms u_j = x + a_j + a_{j-1} .. a_{j-d} itself (no elementwise kernels)
            m = ops.gate_up_silu(a, weights.post_norm, weights.gate, weights.up, self._eps("post_attention_layernorm"),
                                 x, self.bypass)
            return ops.down_sum(m, weights.down, x, a)
        from .ops.gate_up import mlp_inputs_reference  # lazy: importing the ops imports Triton

        u = mlp_inputs_reference(x, a, self.bypass)
        out = x + a.sum(0)
        for j, layer in enumerate(self.layers):
            out = out + layer.mlp(layer.post_attention_layernorm(u[j]))
        return out

    # ------------------------------------------------------------------ pieces
    def _eps(self, norm_name: str) -> float:
        norm = getattr(self.layers[0], norm_name)
        return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def _qk_norm(self, q, k, weights: LayerWeights | None, ops):
        """q [M, P, nh, D], k [M, P, nkv, D]: each layer's per-head RMSNorm (Qwen3)."""
        if weights is not None:
            eps = float(self.layers[0].self_attn.q_norm.variance_epsilon)
            q = ops.rms_norm(q, torch.stack(weights.q_norm)[:, None, :], eps)
            k = ops.rms_norm(k, torch.stack(weights.k_norm)[:, None, :], eps)
            return q, k
        qs = [layer.self_attn.q_norm(q[:, j]) for j, layer in enumerate(self.layers)]
        ks = [layer.self_attn.k_norm(k[:, j]) for j, layer in enumerate(self.layers)]
        return torch.stack(qs, dim=1), torch.stack(ks, dim=1)


class _HFAttention:
    """Attention stage over transformers' cache object and attention functions (any mask form);
    decode steps (T = 1) through the op set's split-KV kernel where it understands the mask."""

    def __init__(self, B, T, attention_mask, position_embeddings, cache, cache_position, kwargs):
        self.B, self.T = B, T
        self.mask, self.cache, self.cache_position, self.kwargs = attention_mask, cache, cache_position, kwargs
        self.cos, self.sin = position_embeddings

    def __call__(self, g: CQILGroup, x, weights, ops) -> torch.Tensor:
        B, T, P, nkv = self.B, self.T, g.size, g.num_kv_heads
        q, k, v = g.project_qkv(x, weights, ops)
        q, k, v = g.heads_first(q, k, v, B, T)
        q, k = g.rotary(q, k, self.cos, self.sin)
        keys, values = [], []
        for j, layer in enumerate(g.layers):
            kj = k[:, j * nkv : (j + 1) * nkv]
            vj = v[:, j * nkv : (j + 1) * nkv]
            if self.cache is not None:
                kj, vj = compat.cache_update(self.cache, kj, vj, layer.self_attn.layer_idx, self.cos, self.sin,
                                             self.cache_position)
            keys.append(kj)
            values.append(vj)
        attn0 = g.layers[0].self_attn
        window = sliding_window_of(g.family, attn0)
        out = None
        if weights is not None and T == 1 and not attn0.training:
            # the op set's decode attention: [B, P*nh, D], or None to use the model's own
            out = ops.decode_attention(q, keys, values, self.mask, window, attn0.scaling)
        if out is None:
            k_all = keys[0] if P == 1 else torch.cat(keys, dim=1)
            v_all = values[0] if P == 1 else torch.cat(values, dim=1)
            extra = {"sliding_window": window} if g.family.sliding_window_from is not None else {}
            out, _ = _attention_fn(attn0)(
                attn0, q, k_all, v_all, self.mask,
                dropout=0.0 if not attn0.training else attn0.attention_dropout, scaling=attn0.scaling,
                **extra, **self.kwargs,
            )  # HF attention functions return [B, T, heads, D]
        heads = out.reshape(B * T, P, -1).transpose(0, 1)  # [P, B*T, nh*D], strided
        return g.o_proj(heads, weights, ops)


class _ModuleAttention:
    """Attention stage through each layer's own attention module (it updates its cache slot and,
    with eager attention, returns weights that transformers' output hooks record)."""

    def __init__(self, B, T, attention_mask, position_embeddings, cache, cache_position, output_attentions, kwargs):
        self.B, self.T = B, T
        # the keywords transformers' own decoder layer passes its attention module
        self.call_kwargs = dict(kwargs, attention_mask=attention_mask, position_embeddings=position_embeddings)
        if cache is not None:
            self.call_kwargs[compat.cache_kwarg_name()] = cache
        if cache_position is not None:
            self.call_kwargs["cache_position"] = cache_position
        if output_attentions is not None:  # transformers < 5 passes the flag down
            self.call_kwargs["output_attentions"] = output_attentions

    def __call__(self, g: CQILGroup, x, weights, ops) -> torch.Tensor:
        B, T = self.B, self.T
        h = x.view(B, T, -1)
        outs = []
        for layer in g.layers:
            a, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), **self.call_kwargs)
            outs.append(a.reshape(B * T, -1))
        return torch.stack(outs)
