"""One CQIL group: P adjacent decoder layers computed from one shared input.

Semantics (design.md section 1), for group input h and bypass distance d:

    a_j   = Attn_j(RMSNorm_in_j(h))
    b_j   = sum_{i=1..min(d, j)} a_{j-i}
    m_j   = MLP_j(RMSNorm_post_j(h + a_j + b_j))
    h_out = h + sum_j (a_j + m_j)

The group keeps the layers in ``model.model.layers`` (length, order, parameter names unchanged):
the first layer of the group (the leader) computes the whole group, the others (followers) pass
their input through. Each original layer keeps its own cache slot, updated once per forward.

Two ways to run the projections, same math:
- stacked: the weight families of the P layers live in [P, ...] buffers (``StackedWeights``) and
  run as grouped GEMMs through a backend's ops (torch references or Triton kernels);
- modules: each layer's own modules are called (used when a module was wrapped, e.g. by PEFT's
  LoRA, when gradients must reach the parameters, or when weights cannot be stacked).
"""

from __future__ import annotations

import sys

import torch

from . import compat
from .families import Family, sliding_window_of
from .stacking import StackedWeights, stackable_reason

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
    if impl in (None, "eager"):
        eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward")
        return eager
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward")
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    return ALL_ATTENTION_FUNCTIONS[impl]


class CQILGroup:
    """A group of P consecutive decoder layers of one model (not an nn.Module on purpose:
    registering it would add state-dict keys and move the layers under a new parent).

    Args:
        layers: the P decoder layer modules, in order.
        indices: their indices in ``model.model.layers``.
        bypass: the distance d, 0 <= d <= P-1.
        family: the model family row from ``families.FAMILIES``.
        backend: "torch" or "triton": which ops the stacked path uses.
    """

    def __init__(self, layers, indices, bypass: int, family: Family, backend: str):
        self.layers = list(layers)
        self.indices = tuple(indices)
        self.bypass = bypass
        self.family = family
        self.backend = backend
        attn0 = self.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.num_heads = attn0.q_proj.out_features // self.head_dim
        self.num_kv_heads = attn0.k_proj.out_features // self.head_dim
        self.rotary = _rotary_fn(self.layers[0])
        self.stack_reason = stackable_reason(self.layers)
        self.stack = StackedWeights(self.layers, family.qk_norm) if self.stack_reason is None else None
        self._ops = None

    @property
    def size(self) -> int:
        return len(self.layers)

    # ------------------------------------------------------------------ path choice
    def use_stacked(self) -> bool:
        """Whether this call can run the grouped kernels on the stacked buffers (restacks if stale)."""
        if self.stack is None:
            return False
        if torch.is_grad_enabled() and any(a.param.requires_grad for a in self.stack.aliases):
            # Gradients must reach the layers' own parameters, not the buffers behind them.
            return False
        if torch.compiler.is_compiling():
            return True  # checked eagerly before capture; data_ptr() cannot be traced
        if not self.stack.modules_intact():
            return False
        if not self.stack.is_fresh():
            self.stack.build()  # parameters were re-allocated (.to(), assign=True): restack
        return True

    def ops(self):
        if self._ops is None:
            from .backends import get_ops

            self._ops = get_ops(self.backend)
        return self._ops

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_embeddings=None, **kwargs) -> torch.Tensor:
        """hidden_states [B, T, H] -> group output [B, T, H] (transformers' layer interface)."""
        cache = compat.pop_cache(kwargs)
        kwargs.pop("use_cache", None)
        kwargs.pop("output_attentions", None)
        cache_position = kwargs.pop("cache_position", None)
        if position_embeddings is None:
            raise ValueError("CQIL groups need position_embeddings from the model (transformers >= 4.48)")
        stacked = self.use_stacked()
        B, T, H = hidden_states.shape
        x = hidden_states.reshape(B * T, H)
        q, k, v = self.project_qkv(x, stacked)
        q, k, v = self.heads_first(q, k, v, B, T)
        cos, sin = position_embeddings
        q, k = self.rotary(q, k, cos, sin)
        attn_out = self._attention(q, k, v, cache, cos, sin, cache_position, attention_mask, kwargs)  # [B, T, P, nh*D]
        out = self.finish(x, attn_out.reshape(B * T, self.size, -1).transpose(0, 1), stacked)
        return out.view(B, T, H)

    # ------------------------------------------------------------------ stages (also used by the decode engine)
    # ``ops``: the op set of the stacked path; None = this group's backend (the decode engine
    # passes its own, so a group converted with one backend can run in an engine of another).
    def project_qkv(self, x: torch.Tensor, stacked: bool, ops=None):
        """Shared input x [M, H] -> q [M, P, nh, D], k and v [M, P, nkv, D] (Qwen3 q/k norm applied).

        Step 1-2 of the decomposition: one GEMM over the N-concatenated q/k/v weights of the P
        layers, each layer's input RMSNorm weight applied to the once-normalised input.
        """
        M = x.shape[0]
        P, nh, nkv, D = self.size, self.num_heads, self.num_kv_heads, self.head_dim
        ops = ops or self.ops()
        if stacked:
            s = self.stack
            qkv = ops.qkv_gemm(x, s.input_norm, s.qkv_weight, s.qkv_bias, self._eps("input_layernorm"))
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
            q, k = self._qk_norm(q, k, stacked, ops)
        return q, k, v

    def qkv_rope_cache(self, x, cos, sin, k_cache, v_cache, slot, tokens_per_seq: int, ops=None):
        """Static-cache form of steps 1-3 (decode engine; stacked path only): x [M, H] -> rotated
        q [M, P*nh, D]; each layer's k (normed for Qwen3, rotated) and v written into the
        [L, B, nkv, S, D] caches at its own layer index and slots ``slot[0] + t``.

        cos/sin: [M, D] (full-width rotary). Two kernels with the Triton op set, instead of the
        reduction, layout copies, RoPE expressions and per-layer cache writes of the stages above.
        """
        ops = ops or self.ops()
        s = self.stack
        qk_eps = float(self.layers[0].self_attn.q_norm.variance_epsilon) if self.family.qk_norm else 0.0
        return ops.qkv_rope_cache(
            x, s.input_norm, s.qkv_weight, s.qkv_bias, self._eps("input_layernorm"), cos, sin, s.q_norm, s.k_norm,
            qk_eps, k_cache, v_cache, self.indices[0], slot, tokens_per_seq, self.num_heads,
        )

    def heads_first(self, q, k, v, B: int, T: int):
        """[B*T, P, heads, D] -> [B, P*heads, T, D]: the group's heads as one attention's heads."""
        P, nh, nkv, D = self.size, self.num_heads, self.num_kv_heads, self.head_dim
        q = q.reshape(B, T, P * nh, D).transpose(1, 2)
        k = k.reshape(B, T, P * nkv, D).transpose(1, 2)
        v = v.reshape(B, T, P * nkv, D).transpose(1, 2)
        return q, k, v

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor, stacked: bool, ops=None) -> torch.Tensor:
        """x [M, H] and attention outputs [P, M, nh*D] -> group output [M, H].

        Steps 5-7: o_proj per layer (batched GEMM), the bypass, per-layer post-norm + gate/up with
        SiLU*up fused, and one down-projection GEMM over the K-concatenation whose K reduction is
        the sum over layers, with the residual and the attention outputs added in its epilogue.
        """
        ops = ops or self.ops()
        if stacked:
            # strided [P, M, nh*D] views are fine: the kernel and bmm take strides (no copy kernel)
            a = ops.batched_gemm(attn_out, self.stack.o_weight, None)
        else:
            a = torch.stack([layer.self_attn.o_proj(attn_out[j]) for j, layer in enumerate(self.layers)])
        # bypass: layer j's MLP input also gets the d attention outputs before it in the group
        if stacked:
            s = self.stack
            # gate_up_silu forms u_j = x + a_j + a_{j-1} .. a_{j-d} itself (no elementwise kernels)
            m = ops.gate_up_silu(a, s.post_norm, s.gate_up_weight, self._eps("post_attention_layernorm"), x, self.bypass)
            return ops.down_sum(m, s.down_weight, x, a)
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

    def _qk_norm(self, q, k, stacked: bool, ops):
        """q [M, P, nh, D], k [M, P, nkv, D]: each layer's per-head RMSNorm (Qwen3)."""
        if stacked:
            eps = float(self.layers[0].self_attn.q_norm.variance_epsilon)
            q = ops.rms_norm(q, self.stack.q_norm[:, None, :], eps)
            k = ops.rms_norm(k, self.stack.k_norm[:, None, :], eps)
            return q, k
        qs = [layer.self_attn.q_norm(q[:, j]) for j, layer in enumerate(self.layers)]
        ks = [layer.self_attn.k_norm(k[:, j]) for j, layer in enumerate(self.layers)]
        return torch.stack(qs, dim=1), torch.stack(ks, dim=1)

    def _attention(self, q, k, v, cache, cos, sin, cache_position, attention_mask, kwargs):
        """q [B, P*nh, T, D], k/v [B, P*nkv, T, D] -> attention output [B, T, P, nh*D]."""
        P, nkv = self.size, self.num_kv_heads
        B, _, T, D = q.shape
        keys, values = [], []
        for j, layer in enumerate(self.layers):
            kj = k[:, j * nkv : (j + 1) * nkv]
            vj = v[:, j * nkv : (j + 1) * nkv]
            if cache is not None:
                kj, vj = compat.cache_update(cache, kj, vj, layer.self_attn.layer_idx, cos, sin, cache_position)
            keys.append(kj)
            values.append(vj)
        attn0 = self.layers[0].self_attn
        ops = self.ops() if self.stack is not None else None
        fast = getattr(ops, "decode_attention", None) if ops is not None else None
        if fast is not None and T == 1 and not self.layers[0].training:
            out = fast(q, keys, values, attention_mask, sliding_window_of(self.family, attn0), attn0.scaling)
            if out is not None:
                return out.reshape(B, 1, P, -1)
        k_all = keys[0] if P == 1 else torch.cat(keys, dim=1)
        v_all = values[0] if P == 1 else torch.cat(values, dim=1)
        extra = {}
        window = sliding_window_of(self.family, attn0)
        if self.family.sliding_window_from is not None:
            extra["sliding_window"] = window
        out, _ = _attention_fn(attn0)(
            attn0,
            q,
            k_all,
            v_all,
            attention_mask,
            dropout=0.0 if not attn0.training else attn0.attention_dropout,
            scaling=attn0.scaling,
            **extra,
            **kwargs,
        )
        # HF attention functions return [B, T, heads, D]
        return out.reshape(B, T, P, -1)
