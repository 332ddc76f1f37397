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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .plan import CQILPlan

__all__ = [
    "EvalResult",
    "BaseLogProbs",
    "evaluate",
    "compare_plans",
    "base_log_probs",
    "plan_applied",
    "decoder_layers",
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
def _conversion():
    # Looked up at call time (not bound at import) so tests can substitute a conversion module.
    from . import conversion

    return conversion


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder-layer list of a HF causal LM (``model.model.layers``) or base model."""
    return _conversion().decoder_layers(model)


def _is_parallel(plan: CQILPlan | None) -> bool:
    return plan is not None and len(plan.parallel_groups) > 0


def _set_plan(model, plan: CQILPlan | None, backend: str) -> None:
    """Put ``model`` into exactly ``plan`` (None or no parallel group: sequential), in place."""
    conv = _conversion()
    if conv.get_plan(model) is not None:
        conv.revert(model)
    if _is_parallel(plan):
        conv.convert(model, plan, backend=backend)


@contextmanager
def plan_applied(model, plan: CQILPlan | None, backend: str = "auto"):
    """Run a block with ``model`` converted to ``plan`` (None: sequential); restore its state after.

    Example:
        >>> with plan_applied(model, CQILPlan([[20, 21]])):   # doctest: +SKIP
        ...     logits = model(ids).logits
    """
    conv = _conversion()
    original = conv.get_plan(model)
    try:
        _set_plan(model, plan, backend)
        yield model
    finally:
        _set_plan(model, original, backend)


# ------------------------------------------------------------------------------------ accumulation
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

    def add(self, logp: torch.Tensor, targets: torch.Tensor, base: "_BaseBatch | None") -> None:
        """logp: [n, V] log-probs at scored positions; targets: [n]; base: the same positions' base."""
        self.nll += float(-logp.gather(-1, targets[:, None]).sum())
        self.count += int(targets.numel())
        if base is not None:
            self.has_base = True
            # KL(base || model) per position, summed: sum_v p_b (log p_b - log p_m)
            self.kl += float((base.p * (base.logp - logp)).sum())
            self.agree += int((logp.argmax(-1) == base.top1).sum())

    def result(self, base_ppl: float | None) -> EvalResult:
        if self.count == 0:
            raise ValueError("no scored tokens")
        nll = self.nll / self.count
        return EvalResult(
            perplexity=math.exp(nll),
            nll=nll,
            num_tokens=self.count,
            kl=max(self.kl / self.count, 0.0) if self.has_base else None,
            top1_agreement=self.agree / self.count if self.has_base else None,
            base_perplexity=base_ppl if self.has_base else None,
            seconds=self.seconds,
            tokens_per_second=self.window_tokens / self.seconds if self.seconds > 0 else 0.0,
            plan=self.plan.to_dict() if self.plan is not None else None,
        )


@dataclass
class _BaseBatch:
    logp: torch.Tensor  # [n, V] base log-probs at the scored positions
    p: torch.Tensor  # [n, V] exp(logp), kept to avoid recomputing it for every plan
    top1: torch.Tensor  # [n]

    @classmethod
    def from_logp(cls, logp: torch.Tensor) -> "_BaseBatch":
        return cls(logp=logp, p=logp.exp(), top1=logp.argmax(-1))


@dataclass
class BaseLogProbs:
    """Base-model log-probs at the scored positions of some windows, precomputed.

    ``chunks[i]`` is [n_i, V] float32 for batch ``i`` of ``batch_size`` windows. Memory is
    ``num_scored * V * 4`` bytes (SmolLM2: 200 KB per token): use it for short texts, or when the
    base model cannot be reverted; ``compare_plans`` needs no storage.
    """

    chunks: list
    batch_size: int
    num_windows: int


def _forward_logp(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b, T] ids, [b, T-1] mask -> [n, V] fp32 log-probs of the scored next tokens."""
    logits = model(input_ids=ids, use_cache=False).logits
    # Only scored positions go through the fp32 softmax: that is the memory peak of a batch.
    return F.log_softmax(logits[:, :-1][mask].float(), dim=-1)


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

    Returns:
        (base, results): the sequential model's EvalResult and one EvalResult per plan, each
        with ``kl`` / ``top1_agreement`` / ``base_perplexity`` against the sequential model.
    """
    conv = _conversion()
    original = conv.get_plan(model)
    plans = list(plans)
    for plan in plans:
        if plan is not None:
            plan.validate_for(len(decoder_layers(model)))
    base_stats, stats = _Stats(None), [_Stats(p) for p in plans]
    bar = _progress(len(windows) * windows.seq_len * (1 + len(plans)), desc, progress)
    try:
        for start, end in _batches(len(windows), batch_size):
            ids = windows.input_ids[start:end].to(_device_of(model))
            mask = windows.score_mask(start, end).to(ids.device)
            targets = ids[:, 1:][mask]
            _set_plan(model, None, backend)
            sink: list = []
            t0 = time.perf_counter()
            if on_layer_inputs is not None:
                with _capture_inputs(model, sink):
                    logp = _forward_logp(model, ids, mask)
            else:
                logp = _forward_logp(model, ids, mask)
            base_stats.seconds += time.perf_counter() - t0
            base_stats.window_tokens += ids.numel()
            base = _BaseBatch.from_logp(logp)
            base_stats.add(logp, targets, base)
            if on_layer_inputs is not None:
                on_layer_inputs(sink, mask)
            del sink
            bar.update(ids.numel())
            for plan, st in zip(plans, stats):
                _set_plan(model, plan, backend)
                t0 = time.perf_counter()
                logp = _forward_logp(model, ids, mask)
                st.seconds += time.perf_counter() - t0
                st.window_tokens += ids.numel()
                st.add(logp, targets, base)
                bar.update(ids.numel())
    finally:
        bar.close()
        _set_plan(model, original, backend)
    base_result = base_stats.result(None)
    base_result.base_perplexity = base_result.perplexity
    return base_result, [st.result(base_result.perplexity) for st in stats]


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


@torch.inference_mode()
def base_log_probs(model, windows, *, batch_size: int = 2, progress: bool = True, backend: str = "auto") -> BaseLogProbs:
    """The sequential model's log-probs at every scored position (model reverted for the duration)."""
    chunks = []
    with plan_applied(model, None, backend):
        bar = _progress(len(windows) * windows.seq_len, "base log-probs", progress)
        for start, end in _batches(len(windows), batch_size):
            ids = windows.input_ids[start:end].to(_device_of(model))
            chunks.append(_forward_logp(model, ids, windows.score_mask(start, end).to(ids.device)))
            bar.update(ids.numel())
        bar.close()
    return BaseLogProbs(chunks, batch_size, len(windows))


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
    backend: str = "auto",
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

    Returns:
        EvalResult (``perplexity``, ``kl``, ``top1_agreement``, ``base_perplexity`` ...).

    Example:
        >>> convert(model, CQILPlan([[20, 21]]))                                  # doctest: +SKIP
        >>> r = evaluate(model, default_text("eval"), tok, base_model=model, max_windows=4)  # doctest: +SKIP
        >>> r.perplexity, r.kl, r.top1_agreement                                   # doctest: +SKIP
    """
    windows = _as_windows(data, tokenizer, seq_len, stride, max_windows)
    if base_model is model:
        plan = _conversion().get_plan(model)
        _, (result,) = compare_plans(
            model, windows, [plan], batch_size=batch_size, progress=progress, backend=backend, desc="evaluating"
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
                base = _BaseBatch.from_logp(base_model.chunks[i].to(ids.device))
            elif base_model is not None:
                base_logp = _forward_logp(base_model, ids.to(_device_of(base_model)), mask.to(_device_of(base_model)))
                base = _BaseBatch.from_logp(base_logp.to(ids.device))
                bar.update(ids.numel())
            if base is not None:
                base_stats.add(base.logp, targets, None)
            t0 = time.perf_counter()
            logp = _forward_logp(model, ids, mask)
            stats.seconds += time.perf_counter() - t0
            stats.window_tokens += ids.numel()
            stats.add(logp, targets, base)
            bar.update(ids.numel())
    finally:
        bar.close()
    base_ppl = base_stats.result(None).perplexity if base_stats.count else None
    return stats.result(base_ppl)


def _plan_or_none(model) -> CQILPlan | None:
    try:
        return _conversion().get_plan(model)
    except ImportError:
        return None
