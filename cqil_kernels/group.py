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

Several processes can share a group (``cqil_kernels.distributed``): each holds a contiguous block
of its layers, computes their attention outputs and MLPs, and one all-reduce of the partial sums
gives every rank the same ``h_out`` (the residual is added on the rank holding the group's first
layer only). With a bypass, the ranks first all-gather the group's attention outputs, so a layer
also gets those of earlier layers held elsewhere. One process holding every layer is the
single-device case of the same code.

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

__all__ = ["CQILGroup", "CQILDecoderGroup", "GATHER"]

#: ``CQILGroup.run(..., weights=GATHER)``: gather the layers' weights when the group runs
GATHER = object()


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
    """A group of P consecutive decoder layers of one model, or this process's share of one (not
    an nn.Module on purpose: registering it would add state-dict keys and move the layers under a
    new parent; ``CQILDecoderGroup`` is the module form).

    Holds references to the layers only (no tensors of its own), so it survives ``model.to()``,
    ``load_state_dict(assign=True)``, ``copy.deepcopy`` and pickling unchanged (a split group's
    communicator is the exception: it holds a process group).

    Args:
        layers: the decoder layer modules this process computes, in order (all P of the group, or
            a contiguous block of them).
        indices: their indices in ``model.model.layers``.
        bypass: the distance d, 0 <= d <= P-1.
        family: the model family row from ``families.FAMILIES``.
        backend: "torch" or "triton": which op set the fused path uses.
        group_indices: the whole group's layer indices (default: ``indices``: this process holds
            every layer).
        comm: a ``cqil_kernels.distributed.Communicator`` over the ranks sharing the group (None:
            one process).
    """

    def __init__(self, layers, indices, bypass: int, family: Family, backend: str, group_indices=None, comm=None):
        self.layers = list(layers)
        self.indices = tuple(indices)
        self.group_indices = tuple(indices if group_indices is None else group_indices)
        if not self.layers or len(self.layers) != len(self.indices):
            raise ValueError(f"need one layer per index, got {len(self.layers)} layers for indices {self.indices}")
        if not set(self.indices) <= set(self.group_indices):
            raise ValueError(f"held layers {self.indices} are not part of the group {self.group_indices}")
        # position of the first held layer inside the group
        self.first = self.group_indices.index(self.indices[0])
        if self.group_indices[self.first:self.first + len(self.indices)] != self.indices:
            raise ValueError(f"held layers {self.indices} are not a contiguous block of the group {self.group_indices}")
        self.bypass = int(bypass)
        self.family = family
        self.backend = backend
        self.comm = comm if comm is not None and not comm.trivial else None
        attn0 = self.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.num_heads = attn0.q_proj.out_features // self.head_dim
        self.num_kv_heads = attn0.k_proj.out_features // self.head_dim
        self.rotary = _rotary_fn(self.layers[0])

    @property
    def size(self) -> int:
        """Layers this process computes (the group's P when it holds all of them)."""
        return len(self.layers)

    @property
    def group_size(self) -> int:
        return len(self.group_indices)

    @property
    def split(self) -> bool:
        """Several processes share the group (its reduction is a collective)."""
        return self.comm is not None

    @property
    def adds_residual(self) -> bool:
        """This process adds the group input to the partial sum (once over all ranks)."""
        return self.first == 0

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
    def run(self, x: torch.Tensor, attend, ops=None, weights=GATHER, reduce: bool = True) -> torch.Tensor:
        """The group on x [M, H] -> h_out [M, H]: ``attend(group, x, weights, ops)`` gives the
        attention outputs [P, M, H] of the layers this process holds (after o_proj), then
        :meth:`mlp_stage` (``reduce``: see there). The one stage sequence of every caller.

        ``ops``: the op set of the fused path (default: this group's backend; the decode engine
        passes its own). ``weights``: what ``fused_weights()`` gave, when the caller gathered them
        already (None: the layers' own modules run), or ``GATHER`` to gather them now.
        """
        ops = ops or self.ops()
        if weights is GATHER:
            weights, _ = self.fused_weights()
        a = attend(self, x, weights, ops)
        return self.mlp_stage(x, a, weights, ops, reduce)

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

    def mlp_stage(self, x: torch.Tensor, a: torch.Tensor, weights: LayerWeights | None, ops, reduce: bool = True):
        """x [M, H] and this process's attention outputs a [P, M, H] -> group output [M, H].

        Steps 6-7: the bypass (layer j's MLP input also gets the d attention outputs before it),
        per-layer post-norm + gate/up with SiLU*up fused, and one down-projection GEMM over the
        K-concatenation whose K reduction is the sum over layers, with the residual and the
        attention outputs added in its epilogue. A split group all-gathers ``a`` first when the
        bypass needs other ranks' outputs, and all-reduces the partial sums at the end; with
        ``reduce=False`` it returns its partial sum instead (the caller reduces it, e.g.
        asynchronously to overlap with other work).
        """
        a_in, context = a, 0
        if self.split and self.bypass > 0:
            # every rank of the group takes this branch (same plan), so the collective matches
            a_all = self.comm.all_gather(a)  # [P, M, H], layer order
            lo = max(0, self.first - self.bypass)
            a_in, context = a_all[lo:self.first + self.size], self.first - lo
        residual = x if self.adds_residual else None
        # entry e of a_in gets min(d, e) bypass terms: a distance past the last entry adds none
        bypass = min(self.bypass, a_in.shape[0] - 1)
        if weights is not None:
            # gate_up_silu forms u_j = x + a_j + a_{j-1} .. a_{j-d} itself (no elementwise kernels)
            m = ops.gate_up_silu(a_in, weights.post_norm, weights.gate, weights.up, self._eps("post_attention_layernorm"),
                                 x, bypass, context)
            out = ops.down_sum(m, weights.down, residual, a)
        else:
            from .ops.gate_up import mlp_inputs_reference  # lazy: importing the ops imports Triton

            u = mlp_inputs_reference(x, a_in, bypass, context)
            out = a.sum(0) if residual is None else residual + a.sum(0)
            for j, layer in enumerate(self.layers):
                out = out + layer.mlp(layer.post_attention_layernorm(u[j]))
        if self.split and reduce:
            self.comm.all_reduce_(out)
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
        if self.cache is not None and g.split:
            # layers of the group held by other ranks: keep the cache's per-layer lengths right
            for idx in g.group_indices:
                if idx not in g.indices:
                    compat.cache_touch(self.cache, k[:, :nkv], idx, self.cos, self.sin, self.cache_position)
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
        cache = self.call_kwargs.get(compat.cache_kwarg_name())
        if cache is not None and g.split:
            like = h.new_zeros(B, g.num_kv_heads, T, g.head_dim)
            for idx in g.group_indices:
                if idx not in g.indices:
                    compat.cache_touch(cache, like, idx, None, None, self.call_kwargs.get("cache_position"))
        return torch.stack(outs)


class CQILDecoderGroup(torch.nn.Module):
    """P adjacent decoder layers computed from one shared input, as a module for model code.

    ``convert`` uses the same group code on a model's own layer list; this module is the form
    to build a model with directly: it registers the layers it computes as ``self.layers`` and
    its forward replaces their P sequential calls.

    Args:
        layers: the group's P transformers decoder layers (Llama/Mistral/Qwen2/Qwen3), in order;
            their ``self_attn.layer_idx`` (their cache slots) must be consecutive.
        bypass: the distance d, 0 <= d <= P-1.
        process_group: split the group over this ``torch.distributed`` process group (or
            ``cqil_kernels.distributed.DistContext`` / ``Communicator``): on W ranks (W divides P)
            rank r computes layers ``[r*P/W, (r+1)*P/W)``, the other layers' weights are released
            (meta), and one all-reduce gives every rank the same output. None: one process.
        backend: "auto", "torch" or "triton" (as in ``convert``).

    Forward: hidden_states [B, T, H], position_embeddings (cos, sin) [B, T, D] from the model's
    rotary module, attention_mask (transformers' mask for these layers), past_key_values (a
    transformers cache, updated once per layer) -> [B, T, H] =
    ``h + sum_j (a_j + m_j)`` (design.md section 1).

    Example:
        >>> group = CQILDecoderGroup(model.model.layers[12:14], bypass=1)
        >>> h = group(h, position_embeddings=(cos, sin), attention_mask=mask, past_key_values=cache)
    """

    def __init__(self, layers, bypass: int = 0, process_group=None, backend: str = "auto"):
        super().__init__()
        from .backends import resolve_backend
        from .families import family_of_layer

        layers = list(layers)
        if not layers:
            raise ValueError("a group needs at least one decoder layer")
        family = family_of_layer(layers[0])
        if any(family_of_layer(layer) is not family for layer in layers):
            raise TypeError("the layers of a group must be of one decoder layer class")
        indices = tuple(int(layer.self_attn.layer_idx) for layer in layers)
        if any(b != a + 1 for a, b in zip(indices, indices[1:])):
            raise ValueError(f"the layers' indices {list(indices)} are not consecutive")
        if isinstance(bypass, bool) or not isinstance(bypass, int) or not 0 <= bypass <= max(len(layers) - 1, 0):
            raise ValueError(f"bypass must be an int in [0, {len(layers) - 1}], got {bypass!r}")
        hidden_act = getattr(layers[0].self_attn.config, "hidden_act", "silu")
        if hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {hidden_act!r} is not supported: CQIL implements SiLU-gated MLPs")
        devices = {p.device for layer in layers for p in layer.parameters()}
        if len(devices) != 1 or next(iter(devices)).type == "meta":
            raise ValueError(f"the group's weights must be loaded on one device, got {sorted(map(str, devices))}")
        device = next(iter(devices))
        backend = resolve_backend(backend, device)
        held, comm = list(range(len(layers))), None
        if process_group is not None:
            from .conversion import _communicator

            comm = _communicator(process_group, device)
            W = comm.world_size
            if len(layers) % W:
                raise ValueError(f"a group of {len(layers)} layers cannot be split over {W} ranks (W must divide P)")
            per = len(layers) // W
            held = list(range(comm.rank * per, (comm.rank + 1) * per))
        self.layers = torch.nn.ModuleList([layers[j] for j in held])
        for j, layer in enumerate(layers):
            if j not in held:
                layer.to_empty(device="meta")  # computed by another rank
        self.__dict__["_group"] = CQILGroup([layers[j] for j in held], [indices[j] for j in held], bypass, family,
                                            backend, group_indices=indices, comm=comm)

    @property
    def group(self) -> CQILGroup:
        return self.__dict__["_group"]

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kwargs) -> torch.Tensor:
        if past_key_values is not None:
            kwargs[compat.cache_kwarg_name()] = past_key_values
        return self.group.forward(hidden_states, attention_mask=attention_mask,
                                  position_embeddings=position_embeddings, **kwargs)
