"""Quality of a converted model against its sequential original: perplexity, KL, top-1 agreement.

All metrics are per scored token (see ``texts.TokenWindows``):

- perplexity ``exp(mean NLL)`` of the next token;
- ``KL(base || model)`` in nats, ``sum_v p_base(v) (log p_base(v) - log p_model(v))``, averaged;
- top-1 agreement: how often the argmax next token equals the base model's.

The base distribution is never stored for the whole text (4k tokens x 49k vocabulary is 800 MB in
fp32): ``compare_plans`` runs the sequential model and then every candidate plan on the same batch,
converting in place between them (``convert``/``revert`` cost milliseconds), so one base forward
serves any number of plans. ``evaluate`` is the one-plan case of it.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import conversion
from .conversion import decoder_layers
from .plan import CQILPlan

__all__ = [
    "EvalResult",
    "BaseLogProbs",
    "evaluate",
    "compare_plans",
    "base_log_probs",
    "plan_applied",
]


@dataclass
class EvalResult:
    """Metrics of one model (or plan) on one set of windows.

    ``kl``, ``top1_agreement`` and ``base_perplexity`` are None when no base was given.
    ``tokens_per_second`` is forward-pass throughput over all window tokens (context included).
    """

    perplexity: float
    nll: float
    num_tokens: int
    kl: float | None = None
    top1_agreement: float | None = None
    base_perplexity: float | None = None
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    plan: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ppl_increase(self) -> float | None:
        """Relative perplexity change vs the base, e.g. 0.08 for +8%."""
        if self.base_perplexity is None:
            return None
        return self.perplexity / self.base_perplexity - 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ppl_increase"] = self.ppl_increase
        return d


# ------------------------------------------------------------------------------------ model access
# Every function here that converts the caller's model in place follows one rule: check every
# argument first (nothing is touched when one is bad), remember the model's own plan and its
# already-resolved backend, and restore exactly those in ``finally``. The restore re-applies a plan
# and backend the model was already running, so it cannot fail on the caller's arguments.
def _is_parallel(plan: CQILPlan | None) -> bool:
    return plan is not None and len(plan.parallel_groups) > 0


@dataclass(frozen=True)
class _ModelState:
    """What ``_set_plan`` must restore: the plan a model runs and its resolved backend."""

    plan: CQILPlan | None
    backend: str | None

    @classmethod
    def of(cls, model) -> "_ModelState":
        plan = conversion.get_plan(model)
        return cls(plan, model.__dict__.get("_cqil_backend") if plan is not None else None)


def _check_backend(model, backend: str) -> str:
    """The backend ``backend`` resolves to on the model's device (ValueError when it cannot run)."""
    from .backends import resolve_backend

    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string ('auto', 'torch' or 'triton'), got {backend!r}")
    return resolve_backend(backend, _device_of(model))


def _check_plans(plans, num_layers: int) -> list:
    """Each entry a CQILPlan valid for ``num_layers`` layers, or None (the sequential model)."""
    if isinstance(plans, (CQILPlan, str, bytes)) or not isinstance(plans, Sequence):
        raise TypeError(f"plans must be a list of CQILPlan (or None), got {type(plans).__name__}")
    for i, plan in enumerate(plans):
        if plan is None:
            continue
        if not isinstance(plan, CQILPlan):
            raise TypeError(f"plans[{i}] must be a CQILPlan or None, got {type(plan).__name__}")
        plan.validate_for(num_layers)
    return list(plans)


def _check_windows(windows) -> None:
    from .texts import TokenWindows

    if not isinstance(windows, TokenWindows):
        raise TypeError(f"windows must be TokenWindows (texts.load_windows / make_windows), got {type(windows).__name__}")


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _set_plan(model, plan: CQILPlan | None, backend: str | None) -> None:
    """Put ``model`` into exactly ``plan`` on ``backend`` (None or no parallel group: sequential).

    Nothing changes when the model already runs that plan on that backend.
    """
    target = plan if _is_parallel(plan) else None
    current = _ModelState.of(model)
    if current.plan == target and (target is None or current.backend == backend):
        return
    if current.plan is not None:
        conversion.revert(model)
    if target is not None:
        conversion.convert(model, target, backend=backend)


def _restore(model, state: _ModelState) -> None:
    _set_plan(model, state.plan, state.backend)


@contextmanager
def plan_applied(model, plan: CQILPlan | None, backend: str = "auto"):
    """Run a block with ``model`` converted to ``plan`` (None: sequential); restore its state after.

    The arguments are checked before the model is touched; afterwards (also after an error) the
    model runs its own plan on its own backend again.

    Example:
        >>> with plan_applied(model, CQILPlan([[20, 21]])):   # doctest: +SKIP
        ...     logits = model(ids).logits
    """
    resolved = _check_backend(model, backend)
    (plan,) = _check_plans([plan], len(decoder_layers(model)))
    original = _ModelState.of(model)
    try:
        _set_plan(model, plan, resolved)
        yield model
    finally:
        _restore(model, original)


# ------------------------------------------------------------------------------------ accumulation
def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] fp32 logits -> log-probabilities ``logits - logsumexp(logits)``.

    The same formula as the model side of the KL (``_Stats.add``). ``F.log_softmax`` on the CPU
    is biased by a few 1e-6 per token in fp32 (against a float64 reference; logsumexp is not), which
    showed as a KL of 1.7e-5 nats between SmolLM2 and itself.
    """
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


@dataclass
class _BaseBatch:
    """The base model's next-token distribution at the scored positions of one batch."""

    logp: torch.Tensor  # [n, V] log-probabilities
    p: torch.Tensor  # [n, V] probabilities, kept: every plan of the batch needs them
    top1: torch.Tensor  # [n]

    @classmethod
    def from_logp(cls, logp: torch.Tensor) -> "_BaseBatch":
        return cls(logp=logp, p=logp.exp(), top1=logp.argmax(-1))


class _Stats:
    """Running sums for one model/plan over the scored tokens of many batches."""

    def __init__(self, plan: CQILPlan | None = None):
        self.plan = plan
        self.nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.count = 0
        self.seconds = 0.0
        self.window_tokens = 0
        self.has_base = False

    def add(self, logits: torch.Tensor, targets: torch.Tensor, base: _BaseBatch | None) -> None:
        """logits: [n, V] fp32 at the scored positions (consumed); targets: [n]; base: same positions."""
        lse = torch.logsumexp(logits, dim=-1)  # [n]
        self.nll += float((lse - logits.gather(-1, targets[:, None]).squeeze(-1)).double().sum())
        self.count += int(targets.numel())
        if base is not None:
            self.has_base = True
            self.agree += int((logits.argmax(-1) == base.top1).sum())
            # KL(base || model) = sum_v p_b (log p_b - log q), log q = logits - lse. The difference is
            # formed elementwise before the sum: the algebraically equal
            # "sum p log p - sum p logits + lse" cancels terms of size ~30 in fp32 and was off by
            # ~1e-3 nats/token on SmolLM2, as large as the cost of a good pair.
            diff = logits.neg_().add_(lse[:, None]).add_(base.logp)  # in place: no [n, V] copy
            self.kl += float((base.p * diff).sum(-1).double().sum())

    def result(self, base_ppl: float | None) -> EvalResult:
        if self.count == 0:
            raise ValueError("no scored tokens")
        nll = self.nll / self.count
        return EvalResult(
            perplexity=math.exp(nll),
            nll=nll,
            num_tokens=self.count,
            # rounding can leave an identical distribution at -1e-9
            kl=max(self.kl / self.count, 0.0) if self.has_base else None,
            top1_agreement=self.agree / self.count if self.has_base else None,
            base_perplexity=base_ppl if self.has_base else None,
            seconds=self.seconds,
            tokens_per_second=self.window_tokens / self.seconds if self.seconds > 0 else 0.0,
            plan=self.plan.to_dict() if self.plan is not None else None,
        )


@dataclass
class BaseLogProbs:
    """Base-model log-probs at the scored positions of some windows, precomputed.

    What is stored is what the output head reads: ``chunks[i]`` holds, for batch ``i`` of
    ``batch_size`` windows, the [n_i, H] inputs of the head at the scored positions, and
    ``log_probs(i)`` forms the [n_i, V] fp32 log-probs from them with a copy of the head taken at
    the same time. That is H/V of the memory of the log-probs themselves (SmolLM2: 2.3 KB instead
    of 200 KB per token). For a model whose logits are not its head's output (checked once), the
    log-probs are stored instead (``head_weight`` None). ``result`` is the base model's own
    EvalResult on those windows (perplexity, forward tokens/s), measured on the way.
    """

    chunks: list
    batch_size: int
    num_windows: int
    head_weight: torch.Tensor | None = None
    head_bias: torch.Tensor | None = None
    result: EvalResult | None = None

    def log_probs(self, i: int) -> torch.Tensor:
        """[n_i, V] fp32 log-probs of batch ``i``."""
        if self.head_weight is None:
            return self.chunks[i]
        h = self.chunks[i]
        return log_probs(F.linear(h, self.head_weight, self.head_bias).float())


@contextmanager
def _capture_head_input(model, sink: list):
    """Record the tensor entering the output head ([b, T, H]) of every forward into ``sink``."""
    head = model.get_output_embeddings()

    def hook(module, args):
        sink.append(args[0])

    handle = head.register_forward_pre_hook(hook)
    try:
        yield head
    finally:
        handle.remove()


def _scored_logits(model, ids: torch.Tensor, mask: torch.Tensor, inputs_embeds=None) -> torch.Tensor:
    """[b, T] ids, [b, T-1] mask -> [n, V] fp32 logits predicting the scored tokens."""
    if inputs_embeds is None:
        logits = model(input_ids=ids, use_cache=False).logits
    else:
        logits = model(inputs_embeds=inputs_embeds, use_cache=False).logits
    return logits[:, :-1][mask].float()


def _forward_logp(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b, T] ids, [b, T-1] mask -> [n, V] fp32 log-probs of the scored next tokens."""
    return log_probs(_scored_logits(model, ids, mask))


# ------------------------------------------------------------------------------------ prefix reuse
class _PassThrough(torch.nn.Module):
    """Stands in for a decoder layer whose output is already known: returns its input."""

    def forward(self, hidden_states, *args, **kwargs):
        from .compat import layer_output

        return layer_output(hidden_states)


@contextmanager
def skip_layers(layers, count: int):
    """Replace ``layers[:count]`` (a decoder-layer ModuleList) by pass-throughs for the block.

    The list keeps its length and indices (masks and caches are chosen by layer index), so a
    forward from saved hidden states of layer ``count`` computes only the layers after it.
    """
    saved = [layers[i] for i in range(count)]
    try:
        for i in range(count):
            layers[i] = _PassThrough()
        yield
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


def _first_converted_layer(plan: CQILPlan | None) -> int:
    groups = plan.parallel_groups if plan is not None else ()
    return min(g[0] for g in groups) if groups else 0


# Models on which running from a cached layer input was checked to reproduce the full forward.
_PREFIX_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _prefix_reuse_ok(model, ids, mask, layer: int, hidden: torch.Tensor, reference: torch.Tensor) -> bool:
    """Check once per model that ``model(inputs_embeds=h_layer)`` with the first layers skipped
    gives the logits of the full forward (it will not for a model that scales its embeddings
    inside forward, or a layer list the model does not iterate)."""
    if model not in _PREFIX_OK:
        with skip_layers(decoder_layers(model), layer):
            logits = _scored_logits(model, ids, mask, inputs_embeds=hidden)
        scale = float(reference.abs().max()) or 1.0
        _PREFIX_OK[model] = bool(torch.allclose(logits, reference, rtol=0.0, atol=1e-3 * scale))
        if not _PREFIX_OK[model]:
            warnings.warn("cannot reuse cached layer inputs for this model; running full forwards")
    return _PREFIX_OK[model]


def _batches(num_windows: int, batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, num_windows, batch_size):
        yield start, min(start + batch_size, num_windows)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not enabled, leave=False)


@contextmanager
def _capture_inputs(model, sink: list):
    """Record the hidden states entering every decoder layer ([b, T, H] each) into ``sink``."""
    handles = []

    def hook(module, args, kwargs):
        sink.append(args[0] if args else kwargs["hidden_states"])

    for layer in decoder_layers(model):
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------ public API
def _as_windows(data, tokenizer, seq_len, stride, max_windows):
    from .texts import TokenWindows, make_windows

    if isinstance(data, TokenWindows):
        return data
    if isinstance(data, str):
        data = [data]
    if isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data):
        if tokenizer is None:
            raise ValueError("evaluating raw text needs a tokenizer")
        return make_windows(tokenizer, "\n\n".join(data), seq_len=seq_len, stride=stride, max_windows=max_windows)
    raise TypeError(f"expected TokenWindows, a string or a list of strings, got {type(data).__name__}")


@torch.inference_mode()
def compare_plans(
    model,
    windows,
    plans: Sequence[CQILPlan | None],
    *,
    batch_size: int = 2,
    progress: bool = True,
    backend: str = "auto",
    on_layer_inputs: Callable[[list, torch.Tensor], None] | None = None,
    reuse_prefix: bool = True,
    desc: str = "evaluating plans",
) -> tuple[EvalResult, list[EvalResult]]:
    """Measure several plans against the sequential model, sharing one base forward per batch.

    Args:
        model: a HF causal LM, sequential or converted (its state is restored at the end).
        windows: ``TokenWindows`` ([W, T] ids).
        plans: plans to measure; ``None`` or an empty plan is the sequential model.
        batch_size: windows per forward.
        on_layer_inputs: called after each base forward with the hidden states entering every
            decoder layer (a list of L tensors [b, T, H]) and the [b, T-1] score mask.
        reuse_prefix: layers before a plan's first group compute exactly what the base computed,
            so a plan's forward starts from the base's cached input of that layer (checked once
            per model to reproduce the full forward). Tokens/s then cover only what ran.

    Returns:
        (base, results): the sequential model's EvalResult and one EvalResult per plan, each
        with ``kl`` / ``top1_agreement`` / ``base_perplexity`` against the sequential model.
    """
    num_layers = len(decoder_layers(model))
    resolved = _check_backend(model, backend)
    plans = _check_plans(plans, num_layers)
    _check_windows(windows)
    _check_batch_size(batch_size)
    if on_layer_inputs is not None and not callable(on_layer_inputs):
        raise TypeError(f"on_layer_inputs must be callable, got {type(on_layer_inputs).__name__}")
    original = _ModelState.of(model)
    starts = [_first_converted_layer(p) if reuse_prefix else 0 for p in plans]
    base_stats, stats = _Stats(None), [_Stats(p) for p in plans]
    bar = _progress(len(windows) * windows.seq_len * (1 + len(plans)), desc, progress)
    try:
        for start, end in _batches(len(windows), batch_size):
            ids = windows.input_ids[start:end].to(_device_of(model))
            mask = windows.score_mask(start, end).to(ids.device)
            targets = ids[:, 1:][mask]
            _set_plan(model, None, None)
            sink: list = []
            capture = on_layer_inputs is not None or any(starts)
            t0 = time.perf_counter()
            if capture:
                with _capture_inputs(model, sink):
                    logits = _scored_logits(model, ids, mask)
            else:
                logits = _scored_logits(model, ids, mask)
            base_stats.seconds += time.perf_counter() - t0
            base_stats.window_tokens += ids.numel()
            if any(starts) and not _prefix_reuse_ok(model, ids, mask, num_layers // 2, sink[num_layers // 2], logits):
                starts = [0] * len(plans)
            base = _BaseBatch.from_logp(log_probs(logits))
            base_stats.add(logits, targets, base)  # consumes logits
            if on_layer_inputs is not None:
                on_layer_inputs(sink, mask)
            del logits
            bar.update(ids.numel())
            for plan, first, st in zip(plans, starts, stats):
                _set_plan(model, plan, resolved)
                t0 = time.perf_counter()
                if first > 0:
                    with skip_layers(decoder_layers(model), first):
                        logits = _scored_logits(model, ids, mask, inputs_embeds=sink[first])
                else:
                    logits = _scored_logits(model, ids, mask)
                st.seconds += time.perf_counter() - t0
                st.window_tokens += ids.numel()
                st.add(logits, targets, base)
                del logits
                bar.update(ids.numel())
            del sink, base
    finally:
        bar.close()
        _restore(model, original)
    base_result = base_stats.result(None)
    base_result.base_perplexity = base_result.perplexity
    results = [st.result(base_result.perplexity) for st in stats]
    for r, first in zip(results, starts):
        r.extra["started_at_layer"] = first
    return base_result, results


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


@torch.inference_mode()
def base_log_probs(model, windows, *, batch_size: int = 2, progress: bool = True, backend: str = "auto") -> BaseLogProbs:
    """The sequential model's log-probs at every scored position (model reverted for the duration).

    Returns BaseLogProbs holding the head inputs ([n, H] per batch) and a copy of the head, or the
    log-probs themselves for a model whose logits are not a plain function of its head's input.
    """
    _check_windows(windows)
    _check_batch_size(batch_size)
    chunks = []
    head = model.get_output_embeddings()
    store_hidden = isinstance(head, torch.nn.Linear)
    stats = _Stats(None)
    with plan_applied(model, None, backend):
        bar = _progress(len(windows) * windows.seq_len, "base log-probs", progress)
        for start, end in _batches(len(windows), batch_size):
            ids = windows.input_ids[start:end].to(_device_of(model))
            mask = windows.score_mask(start, end).to(ids.device)
            sink: list = []
            t0 = time.perf_counter()
            with _capture_head_input(model, sink) if store_hidden else nullcontext():
                logits = _scored_logits(model, ids, mask)
            stats.seconds += time.perf_counter() - t0
            stats.window_tokens += ids.numel()
            hidden = sink[-1][:, :-1][mask] if len(sink) == 1 and sink[-1].shape[:2] == ids.shape else None
            if store_hidden and not chunks:
                # Once: the head applied to the captured input must give the model's logits
                # (not so with logit scaling or soft-capping after the head).
                got = None if hidden is None else F.linear(hidden, head.weight, head.bias).float()
                scale = float(logits.abs().max()) or 1.0
                store_hidden = got is not None and bool(torch.allclose(got, logits, rtol=0.0, atol=1e-4 * scale))
                del got
            chunks.append(hidden.clone() if store_hidden else log_probs(logits))
            stats.add(logits, ids[:, 1:][mask], None)
            del logits, sink, hidden
            bar.update(ids.numel())
        bar.close()
    result = stats.result(None)
    result.kl, result.top1_agreement, result.base_perplexity = 0.0, 1.0, result.perplexity
    weight = head.weight.detach().clone() if store_hidden else None
    bias = head.bias.detach().clone() if store_hidden and head.bias is not None else None
    return BaseLogProbs(chunks, batch_size, len(windows), weight, bias, result)


@torch.inference_mode()
def evaluate(
    model,
    data,
    tokenizer=None,
    *,
    base_model=None,
    seq_len: int = 1024,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 2,
    progress: bool = True,
    backend: str | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on ``data``, and its KL / top-1 agreement against a base.

    Args:
        model: a HF causal LM, converted or not; it is evaluated as it is.
        data: ``TokenWindows``, or text (a string or list of strings; then ``tokenizer``,
            ``seq_len``, ``stride``, ``max_windows`` say how to cut it, see ``texts.make_windows``).
        base_model: what KL and agreement compare against:
            ``None`` (perplexity only); ``model`` itself (the same object, converted in place: the
            base is its reverted self, computed batch by batch); another model (run alongside);
            or ``BaseLogProbs`` from ``base_log_probs`` on the same windows and ``batch_size``.
        batch_size: windows per forward.
        backend: with ``base_model=model``, the backend the converted model is measured on
            (None: its own). The model is left exactly as it was, also after an error.

    Returns:
        EvalResult (``perplexity``, ``kl``, ``top1_agreement``, ``base_perplexity`` ...).

    Raises:
        TypeError / ValueError: a bad argument (checked before the model is touched).

    Example:
        >>> convert(model, CQILPlan([[20, 21]]))                                  # doctest: +SKIP
        >>> r = evaluate(model, default_text("eval"), tok, base_model=model, max_windows=4)  # doctest: +SKIP
        >>> r.perplexity, r.kl, r.top1_agreement                                   # doctest: +SKIP
    """
    windows = _as_windows(data, tokenizer, seq_len, stride, max_windows)
    _check_batch_size(batch_size)
    if not (base_model is None or isinstance(base_model, (BaseLogProbs, torch.nn.Module))):
        raise TypeError(
            f"base_model must be None, a model (e.g. the model itself) or BaseLogProbs, got {type(base_model).__name__}"
        )
    if backend is not None:
        _check_backend(model, backend)
    if base_model is model:
        state = _ModelState.of(model)
        _, (result,) = compare_plans(
            model, windows, [state.plan], batch_size=batch_size, progress=progress,
            backend=(state.backend or "auto") if backend is None else backend, desc="evaluating",
        )
        return result
    if isinstance(base_model, BaseLogProbs) and (
        base_model.batch_size != batch_size or base_model.num_windows != len(windows)
    ):
        raise ValueError(
            f"BaseLogProbs were computed for {base_model.num_windows} windows in batches of "
            f"{base_model.batch_size}; got {len(windows)} windows, batch_size={batch_size}"
        )
    stats, base_stats = _Stats(_plan_or_none(model)), _Stats(None)
    passes = 1 if base_model is None or isinstance(base_model, BaseLogProbs) else 2
    bar = _progress(len(windows) * windows.seq_len * passes, "evaluating", progress)
    try:
        for i, (start, end) in enumerate(_batches(len(windows), batch_size)):
            ids = windows.input_ids[start:end].to(_device_of(model))
            mask = windows.score_mask(start, end).to(ids.device)
            targets = ids[:, 1:][mask]
            base = None
            if isinstance(base_model, BaseLogProbs):
                base_logp = base_model.log_probs(i).to(ids.device)
            elif base_model is not None:
                bdev = _device_of(base_model)
                base_logp = _forward_logp(base_model, ids.to(bdev), mask.to(bdev)).to(ids.device)
                bar.update(ids.numel())
            if base_model is not None:
                if base_logp.shape[0] != targets.numel():
                    raise ValueError("BaseLogProbs do not match these windows (different scored positions)")
                base = _BaseBatch.from_logp(base_logp)
                base_stats.add(base_logp, targets, None)
                del base_logp
            t0 = time.perf_counter()
            logits = _scored_logits(model, ids, mask)
            stats.seconds += time.perf_counter() - t0
            stats.window_tokens += ids.numel()
            stats.add(logits, targets, base)
            del logits, base
            bar.update(ids.numel())
    finally:
        bar.close()
    base_ppl = base_stats.result(None).perplexity if base_stats.count else None
    return stats.result(base_ppl)


def _plan_or_none(model) -> CQILPlan | None:
    try:
        return conversion.get_plan(model)
    except ImportError:
        return None
