"""Low-latency generation: a static KV cache, fused group kernels, and one CUDA graph per decode step.

Eager decode of a small model is launch-bound (an eager op costs ~9 us of CPU, a Triton launch
~14 us, a kernel inside a CUDA graph ~1.2 us), so on CUDA the whole decode step - embedding, every
group or layer, final norm, lm_head - is captured once per batch size and replayed per token.

The engine walks ``model.model.layers`` as segments: each CQIL group is one segment (the group's
own stacked weights and stages, see ``group.py``); every layer outside a group is a segment of one
layer run by the same kernels (P = 1), so "no groups" and "P2" use identical code.

The KV cache is one buffer per K and V, ``[L, B, nkv, S, D]``: the P layers of a group are views at
a constant stride, so the split-KV decode kernel reads them without a copy. Decode attends with a
fixed ``kv_len = S`` and a ``[B, S]`` keep-mask (left padding, unused slots), so the captured graph
stays valid for every step; the write slot, read on the device, bounds the slots it reads (so a
step costs the live length, not S). Prefill runs eagerly with SDPA over the group's P*nh heads.

Semantics match transformers' ``generate`` for the same model (greedy: the same tokens up to
floating-point ties); positions follow transformers (``cumsum(mask) - 1``, padding at 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import get_ops, resolve_backend
from .conversion import decoder_layers, get_plan, is_converted
from .families import family_of_layer
from .group import CQILGroup

__all__ = ["DecodeEngine", "generate"]


class DecodeEngine:
    """Static-cache (and, on CUDA, CUDA-graph) generation for a converted or plain causal LM.

    Args:
        model: a transformers Llama/Mistral/Qwen2/Qwen3 causal LM, converted with
            ``cqil_kernels.convert`` or not. Its weights are used in place (layers outside groups
            get single-layer stacked views, values unchanged).
        max_batch_size: largest batch ``generate`` will see.
        max_length: KV-cache length S = prompt + new tokens, at most.
        backend: "auto" (Triton on CUDA), "triton" or "torch" for the GEMMs of every segment.
        cuda_graph: capture the decode step (default: True on CUDA, False elsewhere).

    Example:
        >>> engine = DecodeEngine(model, max_batch_size=1, max_length=512)
        >>> out = engine.generate(input_ids, max_new_tokens=64)   # [B, T + 64]
    """

    def __init__(self, model, max_batch_size: int = 1, max_length: int = 2048, backend: str = "auto", cuda_graph: bool | None = None):
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(model, "lm_head"):
            raise TypeError(f"{type(model).__name__} is not a causal LM with model.model and lm_head")
        if max_batch_size < 1 or max_length < 2:
            raise ValueError(f"need max_batch_size >= 1 and max_length >= 2, got {max_batch_size}, {max_length}")
        self.model = model
        self.inner = inner
        layers = decoder_layers(model)
        self.family = family_of_layer(layers[0])
        cfg = model.config
        window = getattr(cfg, "sliding_window", None)
        uses_window = window is not None and (
            self.family.sliding_window_from == "config"
            or "sliding_attention" in (getattr(cfg, "layer_types", None) or [])
        )
        if uses_window and max_length > window:
            raise ValueError(
                f"max_length {max_length} exceeds the model's sliding window {window}: the decode engine "
                "implements full attention only; use model.generate() for longer sequences"
            )
        p = next(model.parameters())
        self.device, self.dtype = p.device, inner.embed_tokens.weight.dtype
        self.backend = resolve_backend(backend, self.device)
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self.max_batch_size = int(max_batch_size)
        self.max_length = int(max_length)
        attn0 = layers[0].self_attn
        self.num_layers = len(layers)
        self.head_dim = attn0.head_dim
        self.num_kv_heads = attn0.k_proj.out_features // self.head_dim
        shape = (self.num_layers, self.max_batch_size, self.num_kv_heads, self.max_length, self.head_dim)
        if self.backend == "triton":
            from .ops._common import reserve_tile_counters  # before any graph capture

            # the most split-K counters a step can need: a split decode attention over a group of
            # every layer at the largest batch (the GEMMs' splits need fewer, see _common)
            reserve_tile_counters(self.device, self.max_batch_size * self.num_layers * self.num_kv_heads)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        from .ops import decode_attention, decode_attention_reference

        # the torch backend is torch end to end (its reference), not "Triton where it can run"
        self._decode_attention = decode_attention_reference if self.backend == "torch" else decode_attention
        self.ops = get_ops(self.backend)
        self._build_segments()
        self._build_rope_tables()
        self._graphs: dict[int, tuple] = {}
        self._pool = None

    # ------------------------------------------------------------------ structure
    def _plan_key(self):
        plan = get_plan(self.model) if is_converted(self.model) else None
        return None if plan is None else plan.to_json()

    def _build_segments(self) -> None:
        layers = decoder_layers(self.model)
        # one sequential step each: a CQIL group, or a single layer as a group of one
        segments, i = [], 0
        while i < len(layers):
            group = getattr(layers[i], "_cqil_group", None)
            if group is not None:
                segments.append(group)
                i += group.size
            else:
                segments.append(CQILGroup([layers[i]], (i,), 0, self.family, self.backend))
                i += 1
        self.segments = segments
        self.plan_key = self._plan_key()

    def _build_rope_tables(self) -> None:
        """cos/sin of every position < max_length, from the model's own rotary module.

        A step then gathers its rows (2 kernels) instead of recomputing them (~7 kernels). The
        values are the module's own: its angles are one product per element, so a table computed
        for all positions at once is bit-identical to per-step calls. Rotary types whose
        frequencies depend on the sequence length ("dynamic") keep calling the module.
        """
        rot = self.inner.rotary_emb
        self._cos_table = self._sin_table = None
        if "dynamic" in str(getattr(rot, "rope_type", "default")):
            return
        with torch.no_grad():
            pos = torch.arange(self.max_length, device=self.device)[None]
            probe = torch.zeros(1, 1, 1, device=self.device, dtype=self.dtype)
            cos, sin = rot(probe, pos)
        self._cos_table, self._sin_table = cos[0], sin[0]  # [S, D]

    def _rotary(self, x, positions):
        """(cos, sin) [B, T, D] for positions [B, T], as ``model.model.rotary_emb(x, positions)``."""
        if self._cos_table is None:
            return self.inner.rotary_emb(x, positions)
        return self._cos_table[positions], self._sin_table[positions]

    def _logits(self, h):
        """Final norm + lm_head -> fp32 logits [B, V]. With a plain RMSNorm and nn.Linear head they
        run as one fused norm + GEMM (``qkv_gemm`` with P = 1; same numerics as the modules)."""
        norm, head = self.inner.norm, self.model.lm_head
        eps = getattr(norm, "variance_epsilon", None)
        if type(head) is torch.nn.Linear and eps is not None and getattr(norm, "weight", None) is not None:
            return self.ops.qkv_gemm(h, norm.weight[None], head.weight, head.bias, float(eps)).float()
        return head(norm(h)).float()

    @property
    def num_sequential_steps(self) -> int:
        self._check_model_unchanged()
        return len(self.segments)

    def _check_model_unchanged(self) -> None:
        if self._plan_key() != self.plan_key:
            # converted or reverted since the engine was built: rebuild, and drop captured graphs
            self._build_segments()
            self._graphs.clear()

    # ------------------------------------------------------------------ one segment
    def _segment_forward(self, g: CQILGroup, x2d, B, T, cos, sin, attend):
        """x2d [B*T, H] -> [B*T, H]; ``attend(g, q, k, v)`` does cache and attention."""
        stacked = g.use_stacked()
        q, k, v = g.project_qkv(x2d, stacked, self.ops)
        q, k, v = g.heads_first(q, k, v, B, T)
        q, k = g.rotary(q, k, cos, sin)
        attn = attend(g, q, k, v)  # [P, B*T, nh*D]
        return g.finish(x2d, attn, stacked, self.ops)

    def _write_cache(self, layer_indices, k, v, B, slot_index):
        """k/v [B, P*nkv, T, D] into each layer's cache slot(s) ``slot_index`` (long [T])."""
        nkv = self.num_kv_heads
        for j, layer in enumerate(layer_indices):
            self.k_cache[layer, :B].index_copy_(2, slot_index, k[:, j * nkv : (j + 1) * nkv])
            self.v_cache[layer, :B].index_copy_(2, slot_index, v[:, j * nkv : (j + 1) * nkv])

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompt [B, T] (left padding in attention_mask) into the cache; logits [B, V] of the last position."""
        self._check_model_unchanged()
        B, T = input_ids.shape
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        x = self.inner.embed_tokens(input_ids)
        cos, sin = self._rotary(x, positions)
        keep = attention_mask.bool()
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        mask = causal[None] & keep[:, None, :]
        # a padding query sees no key: let it see itself so SDPA gives no NaN (its output is unused)
        mask = (mask | torch.eye(T, dtype=torch.bool, device=self.device)[None])[:, None]
        slots = torch.arange(T, device=self.device)

        def attend(g, q, k, v):
            self._write_cache(g.indices, k, v, B, slots)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=g.layers[0].self_attn.scaling, enable_gqa=True)
            return out.transpose(1, 2).reshape(B * T, g.size, -1).transpose(0, 1)

        h = x.reshape(B * T, -1)
        for g in self.segments:
            h = self._segment_forward(g, h, B, T, cos, sin, attend)
        last = h.view(B, T, -1)[:, -1]
        state = self._state(B)
        state["kv_mask"].zero_()
        state["kv_mask"][:, :T] = keep
        state["slot"].fill_(T)
        state["pos"].copy_(positions[:, -1:] + 1)
        return self._logits(last)

    # ------------------------------------------------------------------ decode
    def _state(self, B: int) -> dict:
        """Fixed-address buffers of the decode step for batch size B (CUDA graphs replay on them)."""
        st = getattr(self, "_states", None)
        if st is None:
            st = self._states = {}
        if B not in st:
            dev = self.device
            st[B] = {
                "tok": torch.zeros(B, 1, dtype=torch.long, device=dev),
                "pos": torch.zeros(B, 1, dtype=torch.long, device=dev),
                "slot": torch.zeros(1, dtype=torch.long, device=dev),
                "kv_mask": torch.zeros(B, self.max_length, dtype=torch.bool, device=dev),
            }
        return st[B]

    def _decode_step(self, B: int) -> torch.Tensor:
        """One token per sequence from the fixed buffers; advances them. Returns logits [B, V] fp32."""
        st = self._state(B)
        slot, kv_mask, S = st["slot"], st["kv_mask"], self.max_length
        kv_mask.index_fill_(1, slot, True)  # the new token attends to itself
        x = self.inner.embed_tokens(st["tok"])
        cos, sin = self._rotary(x, st["pos"])

        def cached_attention(g, q):
            """q [B, P*nh, D] against the group's cache slices -> [P, B, nh*D] (a strided view)."""
            keys = [self.k_cache[i, :B] for i in g.indices]
            values = [self.v_cache[i, :B] for i in g.indices]
            # S sizes the launch (static for the graph); slot, on the device, bounds the reads
            out = self._decode_attention(q, keys, values, kv_mask, S, g.layers[0].self_attn.scaling, slot)
            return out.view(B, g.size, -1).transpose(0, 1)

        def attend(g, q, k, v):
            self._write_cache(g.indices, k, v, B, slot)
            return cached_attention(g, q[:, :, 0])

        # Fast path per segment: QKV GEMM + RoPE + cache write (2 kernels), one attention over the
        # P*nh heads, then o_proj / gate-up / down (see group.finish). Needs the stacked weights and
        # a full-width rotary table; anything else takes the staged path above.
        cos2d, sin2d = cos.reshape(B, -1), sin.reshape(B, -1)
        full_rotary = cos2d.shape[-1] == self.head_dim
        h = x.reshape(B, -1)
        for g in self.segments:
            if full_rotary and g.use_stacked():
                q = g.qkv_rope_cache(h, cos2d, sin2d, self.k_cache, self.v_cache, slot, 1, self.ops)
                h = g.finish(h, cached_attention(g, q), True, self.ops)
            else:
                h = self._segment_forward(g, h, B, 1, cos, sin, attend)
        logits = self._logits(h)
        st["pos"].add_(1)
        slot.add_(1)
        return logits

    def _graph_step(self, B: int):
        """Replay the captured step for batch B, capturing it on first use (that call runs eagerly)."""
        entry = self._graphs.get(B)
        if entry is not None:
            graph, logits = entry
            graph.replay()
            return logits
        # Warm up (Triton JIT, cuBLAS handles) on a side stream: this run is the real step.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            first = self._decode_step(B)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        # Capture records kernels without running them, so the buffers are not advanced twice.
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._decode_step(B)
        self._graphs[B] = (graph, logits)
        return first

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, cuda_graph: bool | None = None) -> torch.Tensor:
        """Feed one token per sequence (long [B] or [B, 1]) after ``prefill``; logits [B, V] fp32.

        A convert/revert of the model is picked up by the next ``prefill``, not mid-sequence.
        ``cuda_graph=False`` runs this step eagerly even on a graph engine (same buffers, same
        result; e.g. to count its launches with ``cqil_kernels.launches.LaunchCounter``).

        With CUDA graphs the returned tensor is the graph's static output: it is overwritten by the
        next step (clone it to keep it).
        """
        B = tokens.shape[0]
        self._state(B)["tok"].copy_(tokens.view(B, 1))
        if self.cuda_graph and cuda_graph is not False:
            return self._graph_step(B)
        return self._decode_step(B)

    # ------------------------------------------------------------------ generate
    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Greedy or sampled generation; returns [B, T + new] like ``model.generate`` (left padding).

        Stops early when every sequence has produced an EOS (then pads with ``pad_token_id``).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if B > self.max_batch_size:
            raise ValueError(f"batch {B} exceeds max_batch_size {self.max_batch_size}")
        if T + max_new_tokens > self.max_length:
            raise ValueError(f"prompt {T} + max_new_tokens {max_new_tokens} exceeds max_length {self.max_length}")
        if max_new_tokens < 1:
            return input_ids
        self._check_model_unchanged()
        input_ids = input_ids.to(self.device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        eos = None
        if eos_token_id is not None:
            eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=self.device)
            if pad_token_id is None:
                pad_token_id = int(eos[0])
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        logits = self.prefill(input_ids, attention_mask)
        out = [input_ids]
        for i in range(max_new_tokens):
            nxt = self._choose(logits, do_sample, temperature, top_k, generator)
            if eos is not None:
                nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
                finished |= torch.isin(nxt, eos)
            out.append(nxt[:, None])
            if i + 1 == max_new_tokens or (eos is not None and bool(finished.all())):
                break
            logits = self.step(nxt)
        return torch.cat(out, dim=1)

    @staticmethod
    def _choose(logits, do_sample, temperature, top_k, generator):
        if not do_sample:
            return logits.argmax(-1)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        scores = logits / temperature
        if top_k is not None and top_k > 0:
            kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
             backend: str = "auto", cuda_graph: bool | None = None, **kwargs) -> torch.Tensor:
    """Generate with a cached ``DecodeEngine`` for ``model`` (built on first use, rebuilt when the
    batch or length outgrows it). ``kwargs``: do_sample, temperature, top_k, eos_token_id,
    pad_token_id, generator. Returns [B, T + new]."""
    B, T = input_ids.shape
    need = T + max_new_tokens
    engine = model.__dict__.get("_cqil_engine")
    if (
        engine is None
        or engine.max_batch_size < B
        or engine.max_length < need
        or engine.backend != resolve_backend(backend, next(model.parameters()).device)
        or (cuda_graph is not None and engine.cuda_graph != cuda_graph)
    ):
        engine = DecodeEngine(model, max_batch_size=B, max_length=need, backend=backend, cuda_graph=cuda_graph)
        model.__dict__["_cqil_engine"] = engine  # not a submodule: no state-dict entries
    return engine.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, **kwargs)
