"""Recover quality after CQIL conversion: LoRA adapters trained by knowledge distillation.

The converted model (student) learns to match the unconverted model without adapters (teacher):

    loss = T^2 * mean_tokens KL( softmax(z_teacher / T) || softmax(z_student / T) )

over every position of the calibration windows (no labels needed). Only LoRA adapters (peft) on
q/k/v/o/gate/up/down train; by default only the layers of parallel groups get them, which keeps
the layers outside groups exactly as they were. At the end the adapters are merged into the
weights (``merge_and_unload``): the result is again a plain converted model running the fused
fast path, with no inference overhead.

Teacher distribution, exact (no top-k truncation):

- ``teacher="cache"``: one pass of the sequential model over the calibration windows stores what
  its output head reads ([W, T, H] fp32: 0.6 MB per 256-token window at H = 576); each step forms
  the teacher's full log-probs from it with the head (which LoRA leaves alone: it is frozen). The
  log-probs themselves would be V/H times larger (50 MB per window at a 49k vocabulary). Training
  then costs one student forward+backward and one head GEMM per batch instead of a second forward.
- ``teacher="online"``: per batch, under no_grad, the inner model is reverted to sequential and
  the adapters disabled (peft's ``disable_adapter``), then converted back: class swaps, no copies.
- ``"auto"``: cache when it fits ``teacher_cache_bytes`` (and the model's logits are its head's
  output, checked once), else online.

A failed call leaves the model as it was: every argument is checked before the model is touched,
and an error during training removes the adapters again (peft's ``unload``, no merge), restores
the parameters' ``requires_grad`` flags, the training mode and the model's own plan and backend.

Speed (CPU): layers below the first adapted layer are frozen and unchanged, so their output per
window is computed once and training runs from there (``model(inputs_embeds=h)`` with those
layers replaced by pass-throughs; checked once against the full forward, else full forwards).

Imports peft inside functions: ``import cqil_kernels`` stays free of it.
"""

from __future__ import annotations

import math
import numbers
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .evaluate import _ModelState, skip_layers

__all__ = ["DistillResult", "distill", "LORA_TARGETS"]

#: projection names LoRA adapts (Llama/Mistral/Qwen2/Qwen3 names)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DistillResult:
    """What ``distill`` did.

    ``model`` is the trained model: the input model itself with merged weights (``merge=True``), or
    the PeftModel wrapping it. ``before``/``after`` are ``EvalResult.to_dict()`` on the held-out
    windows, against the original sequential model, when ``eval_windows`` was given.
    """

    plan: dict
    settings: dict
    losses: list = field(default_factory=list)  # per step, mean KL * T^2 of the batch
    steps: int = 0
    tokens_seen: int = 0  # student tokens trained on (steps * batch * T)
    train_seconds: float = 0.0  # training loop only
    train_cpu_seconds: float = 0.0  # the same, CPU seconds of every thread (machine load inflates wall time)
    wall_seconds: float = 0.0  # everything, teacher cache and evaluations included
    teacher_seconds: float = 0.0  # teacher cache / prefix precomputation
    teacher: str = ""  # "cache" or "online"
    prefix_layers: int = 0  # frozen layers run once per window instead of every step
    trainable_params: int = 0
    merged: bool = True
    before: dict | None = None
    after: dict | None = None
    model: object = None

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / self.steps if self.steps else 0.0

    def to_dict(self) -> dict:
        return {
            "plan": self.plan,
            "settings": self.settings,
            "steps": self.steps,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "seconds_per_step": self.seconds_per_step,
            "train_cpu_seconds": self.train_cpu_seconds,
            "wall_seconds": self.wall_seconds,
            "teacher_seconds": self.teacher_seconds,
            "teacher": self.teacher,
            "prefix_layers": self.prefix_layers,
            "trainable_params": self.trainable_params,
            "merged": self.merged,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None,
            "losses": self.losses,
            "before": self.before,
            "after": self.after,
        }

    def to_json(self, path=None, indent: int | None = 1) -> str:
        from .report import json_text

        return json_text(self.to_dict(), path, indent)


# ------------------------------------------------------------------------------------ helpers
def _capture_input(layer):
    """Context: records the hidden states [b, T, H] entering ``layer`` into the returned list."""
    sink = []

    def hook(module, args, kwargs):
        sink.append(args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    return sink, handle


def _schedule(kind: str, total: list, warmup: int):
    """LR multiplier for step s; ``total`` is a one-element list so a time budget can shorten it."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        n = max(total[0] - warmup, 1)
        frac = min((step - warmup) / n, 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        if kind == "linear":
            return 1.0 - frac
        return 1.0  # "constant"

    return f


def _kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """student [n, V] logits, teacher [n, V] log-probs at temperature T -> T^2 * mean KL (scalar).

    ``kl_div`` forms p_t * (log p_t - log q_s) elementwise: exact, no cancellation of large terms.
    """
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = F.kl_div(logq, teacher_logp, reduction="sum", log_target=True) / logq.shape[0]
    return kl * temperature**2


def _head_log_probs(head, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """[..., H] head inputs -> [..., V] fp32 log-probs at temperature T (the teacher from its cache)."""
    return F.log_softmax(F.linear(hidden, head.weight, head.bias).float() / temperature, dim=-1)


def _int_arg(name: str, value, minimum: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _float_arg(name: str, value, *, positive: bool, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")


def _check_windows(name: str, windows, vocab_size: int, allow_none: bool = False) -> None:
    from .texts import TokenWindows

    if windows is None and allow_none:
        return
    if not isinstance(windows, TokenWindows):
        raise TypeError(f"{name} must be TokenWindows (texts.load_windows / make_windows), got {type(windows).__name__}")
    ids = windows.input_ids
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{name} hold token ids outside the model's vocabulary [0, {vocab_size})")


def _check_arguments(model, windows, eval_windows, *, rank, alpha, target, steps, lr, batch_size, temperature,
                     weight_decay, schedule, warmup, max_grad_norm, seed, teacher, teacher_cache_bytes,
                     reuse_prefix, max_seconds, merge, eval_batch_size, progress, checkpointing=False):
    """Every check of ``distill``, before anything changes; returns the model's plan."""
    from .conversion import get_plan

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a converted transformers model, got {type(model).__name__}")
    if hasattr(model, "peft_config"):
        raise ValueError("pass the converted model itself, not a PeftModel: distill adds the LoRA adapters")
    plan = get_plan(model)
    if plan is None:
        raise ValueError(
            "distill needs a CQIL-converted model (cqil_kernels.convert(model, plan) first); this model is not converted"
        )
    if not plan.parallel_groups:
        raise ValueError(f"plan {plan.groups} has no parallel group: nothing to distill")
    vocab = model.get_input_embeddings().weight.shape[0]
    _check_windows("windows", windows, vocab)
    _check_windows("eval_windows", eval_windows, vocab, allow_none=True)
    for name, value, minimum in (("rank", rank, 1), ("steps", steps, 1), ("batch_size", batch_size, 1),
                                 ("eval_batch_size", eval_batch_size, 1), ("seed", seed, None)):
        _int_arg(name, value, minimum)
    _int_arg("warmup", warmup, 0, allow_none=True)
    _float_arg("lr", lr, positive=True)
    _float_arg("alpha", alpha, positive=True, allow_none=True)
    _float_arg("temperature", temperature, positive=True)
    _float_arg("weight_decay", weight_decay, positive=False)
    _float_arg("max_grad_norm", max_grad_norm, positive=False, allow_none=True)
    _float_arg("teacher_cache_bytes", teacher_cache_bytes, positive=False)
    _float_arg("max_seconds", max_seconds, positive=True, allow_none=True)
    for name, value, choices in (("target", target, ("grouped", "all")), ("teacher", teacher, ("auto", "cache", "online")),
                                 ("schedule", schedule, ("cosine", "linear", "constant"))):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    for name, value in (("reuse_prefix", reuse_prefix), ("merge", merge), ("progress", progress),
                        ("checkpointing", checkpointing)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    return plan


def _rebuild(model, state: _ModelState) -> None:
    """Convert ``model`` to ``state`` afresh (revert first), so groups are built from its modules as they are now."""
    from .conversion import convert, get_plan, revert

    if get_plan(model) is not None:
        revert(model)
    if state.plan is not None:
        convert(model, state.plan, backend=state.backend)


def _decoder_of(model):
    """The decoder stack under the output head (``model.model`` of a HF causal LM)."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if isinstance(decoder, torch.nn.Module) else model.model


def _head_is_last(model, ids: torch.Tensor) -> bool:
    """Whether the logits are the output head applied to the decoder's last hidden state (no
    scaling or soft-capping after the head): then the loss can be formed chunk by chunk from it."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return False
    ref = model(input_ids=ids, use_cache=False).logits.float()
    got = F.linear(_decoder_of(model)(input_ids=ids, use_cache=False).last_hidden_state, head.weight, head.bias)
    scale = float(ref.abs().max()) or 1.0
    return got.shape == ref.shape and bool(torch.allclose(got.float(), ref, rtol=0.0, atol=1e-4 * scale))


@dataclass
class _Precomputed:
    """What one no-grad pass over the calibration windows gives the training loop."""

    teacher_h: list  # per window [T, H]: the sequential model's last hidden state (cache teacher)
    prefix_h: list  # per window [T, H]: input of layer ``prefix`` (the same in both models)
    prefix: int  # first layer the training forward runs (0: full forwards)
    use_cache: bool
    head_is_last: bool  # logits == head(last hidden state): the loss is formed in token chunks


def _precompute(model, layers, windows, *, use_cache: bool, prefix: int, batch_size: int, backend: str,
                device) -> _Precomputed:
    """Teacher hidden states (sequential model) and/or frozen-prefix inputs, in one pass per window.

    The inputs of layer ``prefix`` are the same in the sequential and the converted model because
    no group lies below it. Both shortcuts are checked against the full computation and dropped
    (online teacher / full forwards) when they do not reproduce it.
    """
    from .evaluate import plan_applied

    head_is_last = _head_is_last(model, windows.input_ids[:1].to(device))
    use_cache = use_cache and head_is_last
    out = _Precomputed([], [], prefix, use_cache, head_is_last)
    if not (use_cache or prefix > 0):
        return out
    decoder = _decoder_of(model)
    sink, handle = _capture_input(layers[prefix]) if prefix > 0 else ([], None)
    try:
        with plan_applied(model, None, backend) if use_cache else nullcontext():
            for s in range(0, len(windows), batch_size):
                ids = windows.input_ids[s : s + batch_size].to(device)
                h = decoder(input_ids=ids, use_cache=False).last_hidden_state
                if use_cache:
                    out.teacher_h.extend(h.unbind(0))
                if prefix > 0:
                    out.prefix_h.extend(sink.pop().unbind(0))
                del h
    finally:
        if handle is not None:
            handle.remove()
    if prefix > 0:
        # Starting at layer ``prefix`` from inputs_embeds must reproduce the converted model's full
        # forward (not so for models that scale embeddings inside forward, e.g. Gemma).
        ref = model(input_ids=windows.input_ids[:1].to(device), use_cache=False).logits.float()
        with skip_layers(layers, prefix):
            got = model(inputs_embeds=out.prefix_h[0][None], use_cache=False).logits.float()
        scale = float(ref.abs().max()) or 1.0
        if not torch.allclose(got, ref, rtol=0.0, atol=1e-3 * scale):
            out.prefix, out.prefix_h = 0, []
    return out


#: tokens per chunk of the loss: [chunk, V] logits at a time instead of [batch * T, V]
LOSS_CHUNK = 128


def _chunked_kl_backward(head, student_h: torch.Tensor, teacher_h: torch.Tensor, temperature: float,
                         chunk: int = LOSS_CHUNK) -> float:
    """T^2 * mean-token KL(teacher || student) over the [..., H] hidden states, with its backward.

    The head (frozen) and the loss run ``chunk`` tokens at a time; each chunk's gradient flows
    into the hidden states, and one backward through the model follows. The sum of the chunks'
    losses is the loss of the whole batch, so this is the same gradient as one [n, V] loss, without
    the [n, V] logits, log-probs and their gradients in memory at once.
    """
    h = student_h.reshape(-1, student_h.shape[-1])
    t = teacher_h.reshape(-1, teacher_h.shape[-1])
    n = h.shape[0]
    leaf = h.detach().requires_grad_(True)
    total = 0.0
    for s in range(0, n, chunk):
        with torch.no_grad():
            tlogp = _head_log_probs(head, t[s : s + chunk], temperature)
        logq = F.log_softmax(F.linear(leaf[s : s + chunk], head.weight, head.bias).float() / temperature, dim=-1)
        loss = F.kl_div(logq, tlogp, reduction="sum", log_target=True) * (temperature**2 / n)
        loss.backward()
        total += float(loss.detach())
        del tlogp, logq, loss
    h.backward(leaf.grad)
    return total


@contextmanager
def checkpointed_layers(layers):
    """Within the block, each decoder layer of ``layers`` runs under non-reentrant activation
    checkpointing when gradients are being recorded (its activations are recomputed in the
    backward instead of kept). Version-independent: an instance ``forward`` that calls the
    layer's own through ``torch.utils.checkpoint``; removed on exit."""
    from torch.utils.checkpoint import checkpoint

    patched = []
    try:
        for layer in layers:
            own = type(layer).forward

            def forward(*args, _layer=layer, _own=own, **kwargs):
                if not torch.is_grad_enabled():
                    return _own(_layer, *args, **kwargs)
                return checkpoint(_own, _layer, *args, use_reentrant=False, **kwargs)

            layer.forward = forward
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward


def _batches_forever(num_windows: int, batch_size: int, seed: int):
    """Window indices, ``batch_size`` at a time, epochs reshuffled by ``seed`` (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:  # new epoch: the rest of the old one first, then a fresh shuffle
            order = order + torch.randperm(num_windows, generator=gen).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


def _train(pm, head, windows, pre: _Precomputed, res: DistillResult, *, steps, lr, weight_decay, schedule, warmup,
           max_grad_norm, seed, batch_size, temperature, max_seconds, backend, device, progress,
           checkpointing=False) -> list:
    """The optimisation loop on the PeftModel ``pm``; fills ``res.losses``/``steps``/``tokens_seen``."""
    from tqdm.auto import tqdm

    from .conversion import decoder_layers
    from .evaluate import plan_applied

    params = [p for n, p in pm.named_parameters() if p.requires_grad]
    if not params or not all("lora_" in n for n, p in pm.named_parameters() if p.requires_grad):
        raise RuntimeError("expected exactly the LoRA adapters to be trainable")
    res.trainable_params = sum(p.numel() for p in params)
    inner = pm.base_model.model
    inner_layers = decoder_layers(inner)
    decoder = _decoder_of(inner)
    V = head.weight.shape[0]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = [steps]
    warm = max(1, round(0.05 * steps)) if warmup is None else max(1, int(warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(schedule, total, warm))
    batches = _batches_forever(len(windows), batch_size, seed)
    bar = tqdm(total=steps, desc="distill", unit="step", disable=not progress, leave=False)
    t_train, c_train = time.perf_counter(), time.process_time()
    step = 0
    stack = ExitStack()
    try:
        if checkpointing:
            stack.enter_context(checkpointed_layers(inner_layers))
        while step < total[0]:
            idx = next(batches)
            ids = windows.input_ids[idx].to(device)
            opt.zero_grad(set_to_none=True)
            if pre.head_is_last:
                with torch.no_grad():
                    if pre.use_cache:
                        th = torch.stack([pre.teacher_h[i] for i in idx])
                    else:
                        with pm.disable_adapter(), plan_applied(inner, None, backend):
                            th = decoder(input_ids=ids, use_cache=False).last_hidden_state
                with skip_layers(inner_layers, pre.prefix) if pre.prefix else nullcontext():
                    if pre.prefix:
                        sh = decoder(inputs_embeds=torch.stack([pre.prefix_h[i] for i in idx]), use_cache=False)
                    else:
                        sh = decoder(input_ids=ids, use_cache=False)
                loss = _chunked_kl_backward(head, sh.last_hidden_state, th, temperature)
                del sh, th
            else:  # logits that are not the head's output: one [n, V] loss of the full forwards
                with torch.no_grad(), pm.disable_adapter(), plan_applied(inner, None, backend):
                    tlogp = F.log_softmax(pm(input_ids=ids, use_cache=False).logits.float() / temperature, dim=-1)
                logits = pm(input_ids=ids, use_cache=False).logits
                full = _kl(logits.reshape(-1, V), tlogp.reshape(-1, V), temperature)
                del logits, tlogp
                full.backward()
                loss = float(full.detach())
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            res.losses.append(loss)
            res.tokens_seen += ids.numel()
            bar.update(1)
            bar.set_postfix(loss=f"{res.losses[-1]:.4f}")
            if max_seconds is not None and step == 2:
                per_step = (time.perf_counter() - t_train) / 2
                fit = max(2, int(max_seconds / per_step))
                if fit < total[0]:
                    total[0] = fit
                    bar.total = fit
    finally:
        stack.close()
        bar.close()
    res.train_seconds = time.perf_counter() - t_train
    res.train_cpu_seconds = time.process_time() - c_train
    res.steps = step
    res.settings["steps_run"] = step
    return params


# ------------------------------------------------------------------------------------ API
def distill(
    model,
    windows,
    *,
    rank: int = 16,
    alpha: float | None = None,
    target: str = "grouped",
    steps: int = 100,
    lr: float = 5e-4,
    batch_size: int = 4,
    temperature: float = 1.0,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    warmup: int | None = None,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    teacher: str = "auto",
    teacher_cache_bytes: float = 6e9,
    reuse_prefix: bool = True,
    checkpointing: bool = False,
    max_seconds: float | None = None,
    merge: bool = True,
    eval_windows=None,
    eval_batch_size: int = 2,
    progress: bool = True,
) -> DistillResult:
    """Train LoRA adapters on a converted ``model`` to match its unconverted self; merge them.

    Args:
        model: a CQIL-converted HF causal LM (``cqil_kernels.convert``); changed in place.
        windows: calibration ``TokenWindows`` (``input_ids`` [W, T]); every position is a
            distillation target (labels are not needed).
        rank, alpha: LoRA rank and alpha (None: ``2 * rank``, i.e. a scale of 2).
        target: ``"grouped"`` (layers of parallel groups only) or ``"all"`` (every layer).
        steps: optimizer steps; each takes ``batch_size`` windows, epochs reshuffled by ``seed``.
        lr, weight_decay, schedule ("cosine", "linear", "constant"), warmup (None: 5% of steps),
            max_grad_norm: AdamW on the adapters only, linear warmup then decay to 0, clipping.
        temperature: T of the KL; the loss is scaled by T^2.
        seed: LoRA initialisation and window order; the run is deterministic for a seed (unless
            ``max_seconds`` cuts it short, which depends on the machine's speed).
        teacher: "cache", "online" or "auto" (see the module docstring).
        teacher_cache_bytes: largest teacher cache "auto" accepts (W * T * H * 4 bytes).
        reuse_prefix: run the frozen layers below the first adapted layer once per window.
        checkpointing: activation checkpointing of every decoder layer in the training forward
            (``torch.utils.checkpoint``, non-reentrant): the backward recomputes each layer's
            activations instead of keeping all of them, so memory holds about one layer's
            activations instead of every layer's, for about one more forward per step. Same
            gradients (the forward is deterministic: no dropout).
        max_seconds: optional training time budget (default None: exactly ``steps`` steps); after
            2 steps the step count is lowered to fit it (the schedule still decays to 0 at the new
            end), so the result then depends on the machine's speed.
        merge: merge adapters into the weights and return the plain converted model; False
            returns the PeftModel (adapters kept, e.g. to save them).
        eval_windows: held-out ``TokenWindows``; perplexity/KL/top-1 against the original
            sequential model before and after (its log-probs are precomputed once, before
            training: the merged weights make the reverted model a different one).
        progress: a tqdm bar over steps.

    Returns:
        DistillResult (``.model`` is the trained model; losses, timings, before/after metrics).

    Raises:
        ValueError / TypeError: ``model`` is not converted (or its plan has no parallel group), or
            a bad argument; checked before the model is touched. An error during training leaves
            the model as it was (adapters removed, flags, mode, plan and backend restored).

    Example:
        >>> convert(model, plan)                                                 # doctest: +SKIP
        >>> res = distill(model, calib_windows, steps=200, eval_windows=heldout)  # doctest: +SKIP
        >>> res.after["ppl_increase"], res.seconds_per_step                      # doctest: +SKIP
    """
    from .conversion import decoder_layers
    from .evaluate import base_log_probs, evaluate

    t_start = time.perf_counter()
    plan = _check_arguments(
        model, windows, eval_windows, rank=rank, alpha=alpha, target=target, steps=steps, lr=lr,
        batch_size=batch_size, temperature=temperature, weight_decay=weight_decay, schedule=schedule, warmup=warmup,
        max_grad_norm=max_grad_norm, seed=seed, teacher=teacher, teacher_cache_bytes=teacher_cache_bytes,
        reuse_prefix=reuse_prefix, max_seconds=max_seconds, merge=merge, eval_batch_size=eval_batch_size,
        progress=progress, checkpointing=checkpointing,
    )
    import peft

    state = _ModelState.of(model)
    backend = state.backend
    layers = decoder_layers(model)
    grouped = sorted({i for g in plan.parallel_groups for i in g})
    adapted = grouped if target == "grouped" else list(range(len(layers)))
    alpha = 2.0 * rank if alpha is None else float(alpha)
    device = next(model.parameters()).device
    W, T = windows.input_ids.shape
    head = model.get_output_embeddings()
    H = head.weight.shape[1]
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    res = DistillResult(
        plan=plan.to_dict(),
        settings=dict(rank=rank, alpha=alpha, target=target, steps=steps, lr=lr, batch_size=batch_size,
                      temperature=temperature, weight_decay=weight_decay, schedule=schedule, warmup=warmup,
                      max_grad_norm=max_grad_norm, seed=seed, windows=W, seq_len=T, adapted_layers=adapted,
                      max_seconds=max_seconds, checkpointing=checkpointing),
        merged=merge,
    )
    pm = None
    try:
        model.eval()  # no dropout: the student must match the teacher's deterministic forward

        # ---- held-out reference: the original sequential model's log-probs, before any change
        base_eval = None
        if eval_windows is not None:
            base_eval = base_log_probs(model, eval_windows, batch_size=eval_batch_size, progress=progress,
                                       backend=backend or "auto")
            res.before = evaluate(model, eval_windows, base_model=base_eval, batch_size=eval_batch_size,
                                  progress=progress).to_dict()

        # ---- teacher cache and frozen-prefix inputs (one no-grad pass over the windows)
        t0 = time.perf_counter()
        use_cache = teacher == "cache" or (teacher == "auto" and W * T * H * 4 <= teacher_cache_bytes)
        with torch.no_grad():
            pre = _precompute(model, layers, windows, use_cache=use_cache, prefix=min(adapted) if reuse_prefix else 0,
                              batch_size=batch_size, backend=backend, device=device)
        res.teacher = "cache" if pre.use_cache else "online"
        res.prefix_layers = pre.prefix
        res.teacher_seconds = time.perf_counter() - t0

        # ---- LoRA (deterministic init for the seed, without touching the caller's global RNG)
        cfg = peft.LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=list(LORA_TARGETS),
            layers_to_transform=adapted, task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pm = peft.get_peft_model(model, cfg)
        pm.eval()
        params = _train(pm, head, windows, pre, res, steps=steps, lr=lr, weight_decay=weight_decay, schedule=schedule,
                        warmup=warmup, max_grad_norm=max_grad_norm, seed=seed, batch_size=batch_size,
                        temperature=temperature, max_seconds=max_seconds, backend=backend, device=device,
                        progress=progress, checkpointing=checkpointing)
        del pre
        for p in params:
            p.requires_grad_(False)  # inference from here on

        # ---- merge back into plain weights; rebuild the groups from the merged layers (the online
        # teacher converted while the LoRA wrappers were in place)
        if merge:
            out = pm.merge_and_unload()
            for n, p in out.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))
            _rebuild(out, state)
        else:
            out = pm
    except BaseException:
        if pm is not None:
            pm.unload()  # the original modules back in place, adapters dropped (not merged)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        _rebuild(model, state)
        model.train(was_training)
        raise
    if was_training:
        out.train()
    res.model = out

    if eval_windows is not None:
        res.after = evaluate(out, eval_windows, base_model=base_eval, batch_size=eval_batch_size,
                             progress=progress).to_dict()
    res.wall_seconds = time.perf_counter() - t_start
    return res
