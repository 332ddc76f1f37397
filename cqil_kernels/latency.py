"""Decode and prefill latency of a model through ``DecodeEngine``, measured on its device.

:func:`measure_latency` converts to a plan for the measurement (the model's state restored
after); :func:`measure_engine` times the model as it is converted, e.g. split over the ranks of a
``torchrun`` run (every rank must call it: the steps are collectives). An untimed warm-up repeat
(Triton JIT, weight tables, CUDA-graph capture) comes first, then ``repeats`` timed ones: median,
min, max and spread. On a GPU the clock waits for the device before every reading.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import torch

from .plan import CQILPlan

__all__ = ["LatencySettings", "measure_latency", "measure_engine", "decode_key", "Clock"]


@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured.

    Attributes:
        batch_sizes / context_lengths: decode is timed at every (B, C): a prefill of C prompt
            tokens per sequence, then ``decode_steps`` steps (the cache holds C + steps + 1
            positions; on a GPU the step attends over all of them, so C is the cache length).
        prompt_len: prefill timed at this many tokens, at every batch size.
        decode_steps: steps per timed repeat; repeats: timed repeats after one untimed warm-up
            repeat (Triton JIT, weight tables, CUDA-graph capture).
        backend: op set of the engine ("auto": Triton on CUDA, torch on the CPU).
        cuda_graph: None = the engine's default (graphs on CUDA).
        launch_config: LaunchConfig (or file) the engine runs under; None: the device's default.
    """

    batch_sizes: tuple[int, ...] = (1,)
    context_lengths: tuple[int, ...] = (128,)
    prompt_len: int = 128
    decode_steps: int = 16
    repeats: int = 5
    backend: str = "auto"
    cuda_graph: bool | None = None
    launch_config: object = None
    seed: int = 0

    def check(self) -> "LatencySettings":
        for name in ("batch_sizes", "context_lengths"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values!r}")
        for name, lo in (("prompt_len", 1), ("decode_steps", 1), ("repeats", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        return self

    @property
    def primary(self) -> str:
        """The decode setting the Pareto set and the recommendation use (the first of each)."""
        return decode_key(self.batch_sizes[0], self.context_lengths[0])


def decode_key(batch: int, context: int) -> str:
    return f"B{batch} ctx{context}"


class Clock:
    """Wall clock that waits for the device before every reading."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _stats(values_ms: list[float]) -> dict:
    med = statistics.median(values_ms)
    return {"median_ms": med, "min_ms": min(values_ms), "max_ms": max(values_ms),
            "spread_pct": (max(values_ms) - min(values_ms)) / med * 100 if med > 0 else 0.0,
            "repeats": len(values_ms), "all_ms": values_ms}


def _prompt(batch: int, length: int, vocab: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, max(4, vocab), (batch, length), generator=g).to(device)
    return ids, torch.ones_like(ids)


@torch.inference_mode()
def _time_decode(engine, batch: int, context: int, settings: LatencySettings, clock: Clock) -> dict:
    """ms per decode step at (batch, context): per repeat the mean over ``decode_steps`` steps."""
    vocab = engine.inner.embed_tokens.num_embeddings
    ids, mask = _prompt(batch, context, vocab, engine.device, settings.seed)
    per_repeat = []
    for r in range(settings.repeats + 1):  # repeat 0: warm-up (JIT, tables, graph capture), not timed
        tok = engine.prefill(ids, mask).argmax(-1)
        t0 = clock.now()
        for _ in range(settings.decode_steps):
            tok = engine.step(tok).argmax(-1)
        t1 = clock.now()
        if r > 0:
            per_repeat.append((t1 - t0) / settings.decode_steps * 1e3)
    return _stats(per_repeat)


@torch.inference_mode()
def _time_prefill(engine, batch: int, settings: LatencySettings, clock: Clock) -> dict:
    vocab = engine.inner.embed_tokens.num_embeddings
    ids, mask = _prompt(batch, settings.prompt_len, vocab, engine.device, settings.seed + 1)
    times = []
    for r in range(settings.repeats + 1):
        t0 = clock.now()
        engine.prefill(ids, mask)
        t1 = clock.now()
        if r > 0:
            times.append((t1 - t0) * 1e3)
    return _stats(times)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_latency(model, plan: CQILPlan, settings: LatencySettings) -> dict:
    """Decode and prefill times of ``model`` converted to ``plan`` (its state restored after).

    Returns ``{"decode": {"B1 ctx128": stats, ...}, "prefill": {"B1 T128": stats, ...},
    "cuda_graph": bool, "launch_config": description}`` with stats ``median_ms``, ``min_ms``,
    ``max_ms``, ``spread_pct``, ``all_ms``.
    """
    from .evaluate import plan_applied

    settings.check()
    with plan_applied(model, plan, settings.backend):
        return measure_engine(model, settings)


def measure_engine(model, settings: LatencySettings, process_group=None) -> dict:
    """The times of :func:`measure_latency` for ``model`` as it is (converted or not, possibly
    split over the ranks of ``process_group``: then a collective, every rank calls it with the
    same settings and gets its own clock's times)."""
    from .engine import DecodeEngine

    settings.check()
    device = next(model.parameters()).device
    clock = Clock(device)
    out = {"decode": {}, "prefill": {}}
    max_b = max(settings.batch_sizes)
    for i, ctx in enumerate(settings.context_lengths):
        need = ctx + settings.decode_steps + 1
        if i == 0:
            need = max(need, settings.prompt_len + 1)  # this engine also times the prefill
        engine = DecodeEngine(model, max_batch_size=max_b, max_length=need, backend=settings.backend,
                              cuda_graph=settings.cuda_graph, launch_config=settings.launch_config,
                              process_group=process_group)
        for b in settings.batch_sizes:
            out["decode"][decode_key(b, ctx)] = _time_decode(engine, b, ctx, settings, clock)
        if i == 0:
            for b in settings.batch_sizes:
                out["prefill"][f"B{b} T{settings.prompt_len}"] = _time_prefill(engine, b, settings, clock)
            out["cuda_graph"] = engine.cuda_graph
            out["backend"] = engine.backend
            out["launch_config"] = engine.effective_launch_config().describe()
        del engine
        _free(device)
    return out
