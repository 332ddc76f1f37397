"""Low-latency generation: a static KV cache, fused group kernels, and one CUDA graph per decode step.

Eager decode of a small model is launch-bound (an eager op costs ~9 us of CPU, a Triton launch
~14 us, a kernel inside a CUDA graph ~1.2 us), so on CUDA the whole decode step - embedding, every
group or layer, final norm, lm_head - is captured once per batch size and replayed per token.

The engine walks ``model.model.layers`` as segments: each CQIL group is one segment (the group's
own stages, see ``group.py``); every layer outside a group is a segment of one layer run by the
same kernels (P = 1), so "no groups" and "P2" use identical code. The kernels read each layer's
own weights; the engine gathers them once per ``prefill`` and notices (and recaptures) when
they moved since a graph was captured.

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
from .conversion import check_model, decoder_layers, get_plan, is_converted, placement_of
from .group import CQILGroup
from .launch_config import LaunchConfig, launch_config_for, load_launch_config, use_launch_config

__all__ = ["DecodeEngine", "generate"]


def _int_arg(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class DecodeEngine:
    """Static-cache (and, on CUDA, CUDA-graph) generation for a converted or plain causal LM.

    Args:
        model: a transformers Llama/Mistral/Qwen2/Qwen3 causal LM, converted with
            ``cqil_kernels.convert`` or not (the same models ``convert`` accepts). Its weights are
            used in place.
        max_batch_size: largest batch ``generate`` will see.
        max_length: KV-cache length S = prompt + new tokens, at most.
        backend: "auto" (Triton on CUDA), "triton", "torch" (or "+csrc" forms, see
            ``cqil_kernels.backends``): the op set of every segment, attention included.
        cuda_graph: capture the decode step (default: True on CUDA, False elsewhere; with several
            ranks only where the collectives can be captured, i.e. NCCL).
        launch_config: a ``LaunchConfig`` or the path of a launch-config file the steps run
            under; None: whatever is current at each step (``use_launch_config`` or the device's
            default). Captured graphs are keyed by (batch size, effective config).
        process_group: the process group the model was converted with
            (``convert(model, plan, process_group=pg)``), to check it is the one intended; the
            engine always runs the groups as converted (each rank its layers, one all-reduce per
            group). Every rank must make the same engine calls in the same order.
        overlap: split each batch into two micro-batches and run micro-batch A's reduction
            asynchronously while B computes, and vice versa (several ranks, batch >= 2; off by
            default: at batch 1 there is nothing to overlap).

    Example:
        >>> engine = DecodeEngine(model, max_batch_size=1, max_length=512)
        >>> out = engine.generate(input_ids, max_new_tokens=64)   # [B, T + 64]
    """

    def __init__(self, model, max_batch_size: int = 1, max_length: int = 2048, backend: str = "auto",
                 cuda_graph: bool | None = None, launch_config: LaunchConfig | str | None = None,
                 process_group=None, overlap: bool = False):
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(model, "lm_head"):
            raise TypeError(f"{type(model).__name__} is not a causal LM with model.model and lm_head")
        self.max_batch_size = _int_arg(max_batch_size, "max_batch_size", 1)
        self.max_length = _int_arg(max_length, "max_length", 2)
        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True, False or None, got {cuda_graph!r}")
        if not isinstance(overlap, bool):
            raise TypeError(f"overlap must be True or False, got {overlap!r}")
        layers, self.family = check_model(model, require_loaded=True)  # what convert refuses, refused here too
        self.model = model
        self.inner = inner
        self.comm = self._model_communicator(process_group)
        self.overlap = overlap
        cfg = model.config
        window = getattr(cfg, "sliding_window", None)
        uses_window = window is not None and (
            self.family.sliding_window_from == "config"
            or "sliding_attention" in (getattr(cfg, "layer_types", None) or [])
        )
        if uses_window and self.max_length > window:
            raise ValueError(
                f"max_length {self.max_length} exceeds the model's sliding window {window}: the decode engine "
                "implements full attention only; use model.generate() for longer sequences"
            )
        p = next(model.parameters())
        self.device, self.dtype = p.device, inner.embed_tokens.weight.dtype
        self.backend = resolve_backend(backend, self.device)
        # ---- op set and launch configuration: the op set decides every kernel, the engine's
        # decode attention included; its buffers are prepared before any graph capture
        self.ops = get_ops(self.backend)
        self.ops.prepare(self.device)
        if launch_config is not None and not isinstance(launch_config, LaunchConfig):
            launch_config = load_launch_config(launch_config, self.device)
        self.launch_config = launch_config
        capturable = self.comm is None or self.comm._uses_nccl  # gloo collectives run on the host
        self.cuda_graph = (self.device.type == "cuda" and capturable) if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        if self.cuda_graph and not capturable:
            raise ValueError(f"cuda_graph=True needs collectives a CUDA graph can capture (NCCL); this process "
                             f"group uses {self.comm.backend}")
        attn0 = layers[0].self_attn
        self.num_layers = len(layers)
        self.head_dim = attn0.head_dim
        self.num_kv_heads = attn0.k_proj.out_features // self.head_dim
        # a KV-cache slot for every layer this process computes (with several ranks: not the
        # layers other ranks hold)
        placed = placement_of(model)
        released = set(placed[2]) if placed is not None else set()
        held = [i for i in range(self.num_layers) if i not in released and not self._held_elsewhere(layers, i)]
        self._slot_of = {layer: slot for slot, layer in enumerate(held)}
        shape = (len(held), self.max_batch_size, self.num_kv_heads, self.max_length, self.head_dim)
        if self.backend.startswith("triton"):
            from .ops._splitk import reserve_tile_counters  # before any graph capture

            # the most split-K counters a step can need: a split decode attention over a group of
            # every layer at the largest batch (the GEMMs' splits need fewer, see ops/_splitk.py)
            reserve_tile_counters(self.device, self.max_batch_size * self.num_layers * self.num_kv_heads)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self._build_segments()
        self._build_rope_tables()
        if self.comm is not None and self.device.type == "cuda":
            # symmetric-memory buffers for the group reductions, allocated before any capture
            self.comm.prepare(self.max_batch_size * inner.embed_tokens.embedding_dim, self.dtype)
        self._graphs: dict[tuple, tuple] = {}  # (B, effective LaunchConfig) -> (graph, logits)
        self._graph_weights = None  # fingerprint of the weights the captured graphs read
        self._pool = None

    # ------------------------------------------------------------------ structure
    def _model_communicator(self, process_group):
        """The communicator of the model's split groups (None: one process)."""
        comms = {id(g.comm): g.comm for layer in decoder_layers(self.model)
                 for g in [getattr(layer, "_cqil_group", None)] if g is not None and g.comm is not None}
        comm = next(iter(comms.values()), None)
        if process_group is not None:
            group = getattr(process_group, "group", process_group)
            if comm is None:
                raise ValueError("process_group was given but the model's groups are not split over ranks: "
                                 "convert it with cqil_kernels.convert(model, plan, process_group=pg) first")
            if comm.group is not group:
                raise ValueError("the model was converted with another process group than the one given")
        return comm

    @staticmethod
    def _held_elsewhere(layers, i: int) -> bool:
        g = getattr(layers[i], "_cqil_group", None)
        return g is not None and i not in g.indices

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
                i += group.group_size
            else:
                segments.append(CQILGroup([layers[i]], (i,), 0, self.family, self.backend))
                i += 1
        self.segments = segments
        self.plan_key = self._plan_key()
        self._weights = [None] * len(segments)

    def _gather_weights(self) -> None:
        """Each segment's weights for the fused kernels (None: it runs its modules), read now and
        kept for the decode steps; captured graphs are dropped if the weights moved."""
        self._weights = [g.fused_weights()[0] for g in self.segments]
        head = self.model.lm_head.weight
        fingerprint = (tuple(w.fingerprint() if w is not None else None for w in self._weights),
                       head.data_ptr(), self.inner.embed_tokens.weight.data_ptr())
        if fingerprint != self._graph_weights:
            self._graphs.clear()
            self._graph_weights = fingerprint

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
            bias = None if head.bias is None else [head.bias]
            return self.ops.qkv_gemm(h, [norm.weight], [head.weight], bias, float(eps)).float()
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

    # ------------------------------------------------------------------ cache writes
    def _write_cache(self, g: CQILGroup, k, v, rows: slice, slot_index):
        """k/v [B, P*nkv, T, D] into each of g's layers' cache slot(s) ``slot_index`` (long [T]),
        batch rows ``rows``."""
        nkv = self.num_kv_heads
        for j, layer in enumerate(g.indices):
            c = self._slot_of[layer]
            self.k_cache[c, rows].index_copy_(2, slot_index, k[:, j * nkv : (j + 1) * nkv])
            self.v_cache[c, rows].index_copy_(2, slot_index, v[:, j * nkv : (j + 1) * nkv])

    # ------------------------------------------------------------------ prefill
    def effective_launch_config(self) -> LaunchConfig:
        """The launch config the next step runs under (the engine's own, else the current one)."""
        return self.launch_config if self.launch_config is not None else launch_config_for(self.device)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompt [B, T] (left padding in attention_mask) into the cache; logits [B, V] of the last position."""
        with use_launch_config(self.effective_launch_config()):
            return self._prefill(input_ids, attention_mask)

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._check_model_unchanged()
        self._gather_weights()
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
        parts = self._micro_batches(B)
        attends = [_PrefillAttention(self, rows, T, cos[rows], sin[rows], mask[rows], slots) for rows in parts]
        hs = [x[rows].reshape(-1, x.shape[-1]) for rows in parts]
        hs = self._run_segments(hs, attends)
        last = torch.cat([h.view(-1, T, h.shape[-1])[:, -1] for h in hs])
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

    def _cached_attention(self, g: CQILGroup, q, rows: slice, kv_mask, slot):
        """q [B, P*nh, D] against g's layers' cache slices (batch rows ``rows``) -> [P, B, nh*D]
        (a strided view); ``slot`` (device) is the last live position."""
        keys = [self.k_cache[self._slot_of[i], rows] for i in g.indices]
        values = [self.v_cache[self._slot_of[i], rows] for i in g.indices]
        # S sizes the launch (static for the graph); slot, on the device, bounds the reads
        out = self.ops.cached_decode_attention(q, keys, values, kv_mask, self.max_length,
                                               g.layers[0].self_attn.scaling, slot)
        return out.view(q.shape[0], g.size, -1).transpose(0, 1)

    def _decode_step(self, B: int) -> torch.Tensor:
        """One token per sequence from the fixed buffers; advances them. Returns logits [B, V] fp32."""
        st = self._state(B)
        st["kv_mask"].index_fill_(1, st["slot"], True)  # the new token attends to itself
        x = self.inner.embed_tokens(st["tok"])
        cos, sin = self._rotary(x, st["pos"])
        parts = self._micro_batches(B)
        attends = [_DecodeAttention(self, rows, cos[rows], sin[rows], st) for rows in parts]
        hs = self._run_segments([x[rows].reshape(-1, x.shape[-1]) for rows in parts], attends)
        logits = self._logits(hs[0] if len(hs) == 1 else torch.cat(hs))
        st["pos"].add_(1)
        st["slot"].add_(1)
        return logits

    # ------------------------------------------------------------------ schedules
    def _micro_batches(self, B: int) -> list[slice]:
        """Batch rows of each micro-batch: two halves with ``overlap`` (several ranks, B >= 2)."""
        if self.overlap and self.comm is not None and B >= 2:
            return [slice(0, B // 2), slice(B // 2, B)]
        return [slice(0, B)]

    def _run_segments(self, hs: list, attends: list) -> list:
        """Every segment on each micro-batch's rows hs[i] [M_i, H]; returns the outputs.

        One micro-batch: each segment in turn (a split group reduces synchronously). Two: micro-
        batch A's group reduction is issued asynchronously and waited for only when A reaches
        the next segment, so it runs while B's attention and MLP compute (and vice versa); on
        CUDA the communicator's handles order the streams with events, and every kernel - cache
        writes and split-K counters included - stays on the compute stream.
        """
        ops = self.ops
        if len(hs) == 1:
            h = hs[0]
            for g, w in zip(self.segments, self._weights):
                h = g.run(h, attends[0], ops, w)
            return [h]
        pending = [None] * len(hs)
        for g, w in zip(self.segments, self._weights):
            for i, attend in enumerate(attends):
                if pending[i] is not None:
                    hs[i], pending[i] = pending[i].wait(), None
                out = g.run(hs[i], attend, ops, w, reduce=False)
                if g.split:
                    pending[i] = g.comm.all_reduce_async_(out)
                else:
                    hs[i] = out
        return [p.wait() if p is not None else h for p, h in zip(pending, hs)]

    def _graph_step(self, B: int, config: LaunchConfig):
        """Replay the step captured for batch B under ``config``, capturing it on first use (that
        call runs eagerly). A graph bakes its launch decisions in, so it is keyed by both."""
        entry = self._graphs.get((B, config))
        if entry is not None:
            graph, logits = entry
            graph.replay()
            return logits
        # Warm up (Triton JIT, cuBLAS handles, weight tables) on a side stream: this run is the real step.
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
        self._graphs[(B, config)] = (graph, logits)
        return first

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, cuda_graph: bool | None = None) -> torch.Tensor:
        """Feed one token per sequence (long [B] or [B, 1]) after ``prefill``; logits [B, V] fp32.

        A convert/revert of the model, or weights that moved, are picked up by the next
        ``prefill``, not mid-sequence. ``cuda_graph=False`` runs this step eagerly even on a graph
        engine (same buffers, same result; e.g. to count its launches with
        ``cqil_kernels.launches.LaunchCounter``).

        With CUDA graphs the returned tensor is the graph's static output: it is overwritten by the
        next step (clone it to keep it).
        """
        B = tokens.shape[0]
        if B not in getattr(self, "_states", {}):
            raise RuntimeError(f"no prefilled sequences of batch size {B}: call prefill() before step()")
        self._state(B)["tok"].copy_(tokens.view(B, 1))
        config = self.effective_launch_config()
        with use_launch_config(config):
            if self.cuda_graph and cuda_graph is not False:
                return self._graph_step(B, config)
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

        With several ranks every rank must call it with the same inputs; sampled tokens are rank
        0's, broadcast (greedy tokens agree by themselves: the ranks' logits are bitwise equal).

        As in transformers: ``eos_token_id`` / ``pad_token_id`` default to the model's
        ``generation_config``; a sequence that produced an EOS is continued with the pad token, and
        generation stops once every sequence has (the result is then shorter than
        T + max_new_tokens). Pass ``eos_token_id=[]`` to generate exactly ``max_new_tokens``.
        """
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask)
        max_new_tokens = _int_arg(max_new_tokens, "max_new_tokens", 1)
        B, T = input_ids.shape
        if B > self.max_batch_size:
            raise ValueError(f"batch {B} exceeds max_batch_size {self.max_batch_size}")
        if T + max_new_tokens > self.max_length:
            raise ValueError(f"prompt {T} + max_new_tokens {max_new_tokens} exceeds max_length {self.max_length}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None:
            _int_arg(top_k, "top_k", 0)
        eos, pad_token_id = self._eos_and_pad(eos_token_id, pad_token_id)
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        logits = self.prefill(input_ids, attention_mask)
        out = [input_ids]
        for i in range(max_new_tokens):
            nxt = self._choose(logits, do_sample, temperature, top_k, generator)
            if do_sample and self.comm is not None:
                self.comm.broadcast_(nxt, src=0)  # every rank continues with rank 0's sample
            if eos is not None:
                nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
                finished |= torch.isin(nxt, eos)
            out.append(nxt[:, None])
            if i + 1 == max_new_tokens or (eos is not None and bool(finished.all())):
                break
            logits = self.step(nxt)
        return torch.cat(out, dim=1)

    def _check_inputs(self, input_ids, attention_mask):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, seq] tensor with seq >= 1, got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer (long) tensor, got {input_ids.dtype}")
        vocab = self.inner.embed_tokens.num_embeddings
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab}) (the vocabulary), got values in [{lo}, {hi}]")
        input_ids = input_ids.to(self.device, torch.long)
        if attention_mask is None:
            return input_ids, torch.ones_like(input_ids)
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {shape}")
        attention_mask = attention_mask.to(self.device)
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1")
        if not bool(attention_mask[:, -1].bool().all()):
            raise ValueError("attention_mask must be left-padded: every sequence's last position must be 1")
        return input_ids, attention_mask.long()

    def _eos_and_pad(self, eos_token_id, pad_token_id):
        gen = getattr(self.model, "generation_config", None)
        if eos_token_id is None:
            eos_token_id = getattr(gen, "eos_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(gen, "pad_token_id", None)
        ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not ids:
            return None, pad_token_id
        for t in ids:
            _int_arg(t, "eos_token_id", 0)
        if pad_token_id is None:
            pad_token_id = ids[0]  # transformers does the same (with a warning)
        return torch.tensor(ids, device=self.device), _int_arg(pad_token_id, "pad_token_id", 0)

    @staticmethod
    def _choose(logits, do_sample, temperature, top_k, generator):
        if not do_sample:
            return logits.argmax(-1)
        scores = logits / temperature
        if top_k is not None and top_k > 0:
            kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]


class _PrefillAttention:
    """Attention stage of the prompt (batch rows ``rows``): q/k/v (staged), RoPE, static-cache
    write, SDPA over the group's P*nh heads, o_proj."""

    def __init__(self, engine: DecodeEngine, rows: slice, T, cos, sin, mask, slots):
        self.e, self.rows, self.T, self.cos, self.sin, self.mask, self.slots = engine, rows, T, cos, sin, mask, slots

    def __call__(self, g: CQILGroup, x, weights, ops):
        T = self.T
        B = x.shape[0] // T
        q, k, v = g.project_qkv(x, weights, ops)
        q, k, v = g.heads_first(q, k, v, B, T)
        q, k = g.rotary(q, k, self.cos, self.sin)
        self.e._write_cache(g, k, v, self.rows, self.slots)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=g.layers[0].self_attn.scaling,
                                             enable_gqa=True)
        return g.o_proj(out.transpose(1, 2).reshape(B * T, g.size, -1).transpose(0, 1), weights, ops)


class _DecodeAttention:
    """Attention stage of one decode step (batch rows ``rows``). Fast path per segment: QKV GEMM
    + RoPE + cache write (2 kernels), one split-KV attention over the P*nh heads, o_proj. Needs the
    fused weights and a full-width rotary table; anything else takes the staged path (same
    cache, same attention)."""

    def __init__(self, engine: DecodeEngine, rows: slice, cos, sin, state):
        self.e, self.rows, self.cos, self.sin, self.st = engine, rows, cos, sin, state
        B = cos.shape[0]
        self.cos2d, self.sin2d = cos.reshape(B, -1), sin.reshape(B, -1)
        self.full_rotary = self.cos2d.shape[-1] == engine.head_dim
        self.kv_mask = state["kv_mask"][rows]

    def __call__(self, g: CQILGroup, x, weights, ops):
        e, rows, st = self.e, self.rows, self.st
        B = x.shape[0]
        if weights is not None and self.full_rotary:
            q = g.qkv_rope_cache(x, weights, ops, self.cos2d, self.sin2d, e.k_cache[:, rows], e.v_cache[:, rows],
                                 st["slot"], 1, cache_layer0=e._slot_of[g.indices[0]])
        else:
            q, k, v = g.project_qkv(x, weights, ops)
            q, k, v = g.heads_first(q, k, v, B, 1)
            q, k = g.rotary(q, k, self.cos, self.sin)
            e._write_cache(g, k, v, rows, st["slot"])
            q = q[:, :, 0]
        return g.o_proj(e._cached_attention(g, q, rows, self.kv_mask, st["slot"]), weights, ops)


class _EngineSlot:
    """Holds the engine ``generate`` caches on a model. A cache, not state: copies and pickles of
    the model get an empty slot (an engine holds KV buffers and CUDA graphs, which neither copy
    nor pickle)."""

    def __init__(self, engine=None):
        self.engine = engine

    def __deepcopy__(self, memo):
        return _EngineSlot()

    def __reduce__(self):
        return (_EngineSlot, ())


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
             backend: str = "auto", cuda_graph: bool | None = None, **kwargs) -> torch.Tensor:
    """Generate with a cached ``DecodeEngine`` for ``model`` (built on first use, rebuilt when the
    batch or length outgrows it). ``kwargs``: do_sample, temperature, top_k, eos_token_id,
    pad_token_id, generator (see ``DecodeEngine.generate``). Returns [B, T + new]."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [batch, seq] tensor")
    max_new_tokens = _int_arg(max_new_tokens, "max_new_tokens", 1)
    B, T = input_ids.shape
    need = T + max_new_tokens
    slot = model.__dict__.get("_cqil_engine")
    engine = slot.engine if isinstance(slot, _EngineSlot) else None
    if (
        engine is None
        or engine.max_batch_size < B
        or engine.max_length < need
        or engine.backend != resolve_backend(backend, next(model.parameters()).device)
        or (cuda_graph is not None and engine.cuda_graph != cuda_graph)
    ):
        engine = DecodeEngine(model, max_batch_size=B, max_length=need, backend=backend, cuda_graph=cuda_graph)
        model.__dict__["_cqil_engine"] = _EngineSlot(engine)  # not a submodule: no state-dict entries
    return engine.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, **kwargs)
