"""Recover quality after CQIL conversion: LoRA adapters trained by knowledge distillation.

The converted model (student) learns to match the unconverted model without adapters (teacher):

    loss = T^2 * mean_tokens KL( softmax(z_teacher / T) || softmax(z_student / T) )

over every position of the calibration windows (no labels needed). Only LoRA adapters (peft) on
q/k/v/o/gate/up/down train; by default only the layers of parallel groups get them, which keeps
the layers outside groups exactly as they were. At the end the adapters are merged into the
weights (``merge_and_unload``): the result is again a plain converted model running the fused
fast path, with no inference overhead.

Teacher distribution, exact (no top-k truncation):

- ``teacher="cache"``: the sequential model's full log-probs of every calibration window are
  computed once before training ([W, T, V] fp32: 50 MB per 256-token window at a 49k vocabulary).
  Training epochs then cost one student forward+backward per batch instead of an extra forward.
- ``teacher="online"``: per batch, under no_grad, the inner model is reverted to sequential and
  the adapters disabled (peft's ``disable_adapter``), then converted back: class swaps, no copies.
- ``"auto"``: cache when it fits ``teacher_cache_bytes``, else online.

Speed (CPU): layers below the first adapted layer are frozen and unchanged, so their output per
window is computed once and training runs from there (``model(inputs_embeds=h)`` with those
layers replaced by pass-throughs; checked once against the full forward, else full forwards).

Imports peft inside functions: ``import cqil_kernels`` stays free of it.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .evaluate import skip_layers

__all__ = ["DistillResult", "distill", "add_distill_arguments", "run_distill_from_args", "LORA_TARGETS"]

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
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")
        return text


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
        teacher_cache_bytes: largest teacher cache "auto" accepts.
        reuse_prefix: run the frozen layers below the first adapted layer once per window.
        max_seconds: training time budget; after 2 steps the step count is lowered to fit it (the
            schedule still decays to 0 at the new end).
        merge: merge adapters into the weights and return the plain converted model; False
            returns the PeftModel (adapters kept, e.g. to save them).
        eval_windows: held-out ``TokenWindows``; perplexity/KL/top-1 against the original
            sequential model before and after (its log-probs are precomputed once, before
            training: the merged weights make the reverted model a different one).
        progress: a tqdm bar over steps.

    Returns:
        DistillResult (``.model`` is the trained model; losses, timings, before/after metrics).

    Raises:
        ValueError: ``model`` is not converted (or its plan has no parallel group), or a bad
            argument.

    Example:
        >>> convert(model, plan)                                                 # doctest: +SKIP
        >>> res = distill(model, calib_windows, steps=200, eval_windows=heldout)  # doctest: +SKIP
        >>> res.after["ppl_increase"], res.seconds_per_step                      # doctest: +SKIP
    """
    from .conversion import convert, decoder_layers, get_plan, revert
    from .evaluate import base_log_probs, evaluate, plan_applied

    t_start = time.perf_counter()
    plan = get_plan(model)
    if plan is None:
        raise ValueError(
            "distill needs a CQIL-converted model (cqil_kernels.convert(model, plan) first); this model is not converted"
        )
    if hasattr(model, "peft_config"):
        raise ValueError("pass the converted model itself, not a PeftModel: distill adds the LoRA adapters")
    grouped = sorted({i for g in plan.parallel_groups for i in g})
    if not grouped:
        raise ValueError(f"plan {plan.groups} has no parallel group: nothing to distill")
    if target not in ("grouped", "all"):
        raise ValueError(f"target must be 'grouped' or 'all', got {target!r}")
    if teacher not in ("auto", "cache", "online"):
        raise ValueError(f"teacher must be 'auto', 'cache' or 'online', got {teacher!r}")
    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")
    if steps < 1 or batch_size < 1 or rank < 1 or temperature <= 0:
        raise ValueError("steps, batch_size and rank must be >= 1 and temperature > 0")
    import peft

    backend = getattr(model, "_cqil_backend", "auto")
    layers = decoder_layers(model)
    num_layers = len(layers)
    adapted = grouped if target == "grouped" else list(range(num_layers))
    alpha = 2.0 * rank if alpha is None else float(alpha)
    device = next(model.parameters()).device
    W, T = windows.input_ids.shape
    V = model.get_output_embeddings().weight.shape[0]
    was_training = model.training
    model.eval()  # no dropout: the student must match the teacher's deterministic forward

    res = DistillResult(
        plan=plan.to_dict(),
        settings=dict(rank=rank, alpha=alpha, target=target, steps=steps, lr=lr, batch_size=batch_size,
                      temperature=temperature, weight_decay=weight_decay, schedule=schedule, warmup=warmup,
                      max_grad_norm=max_grad_norm, seed=seed, windows=W, seq_len=T, adapted_layers=adapted,
                      max_seconds=max_seconds),
        merged=merge,
    )

    # ---- held-out reference: the original sequential model's log-probs, before any change
    base_eval = None
    if eval_windows is not None:
        base_eval = base_log_probs(model, eval_windows, batch_size=eval_batch_size, progress=progress, backend=backend)
        res.before = evaluate(model, eval_windows, base_model=base_eval, batch_size=eval_batch_size,
                              progress=progress, backend=backend).to_dict()

    # ---- teacher cache and frozen-prefix inputs (one no-grad pass over the windows)
    t0 = time.perf_counter()
    cache_bytes = W * T * V * 4
    use_cache = teacher == "cache" or (teacher == "auto" and cache_bytes <= teacher_cache_bytes)
    res.teacher = "cache" if use_cache else "online"
    prefix = min(adapted) if reuse_prefix else 0
    teacher_logp: list[torch.Tensor] = []  # per window [T, V] fp32 log-probs at temperature T
    prefix_h: list[torch.Tensor] = []  # per window [T, H]: input of layer ``prefix`` (converted model)
    with torch.no_grad():
        # One pass over the windows: teacher log-probs (sequential model) and/or the inputs of
        # layer ``prefix``, which are the same in the sequential and the converted model because
        # no group lies below it.
        if use_cache or prefix > 0:
            sink, handle = _capture_input(layers[prefix]) if prefix > 0 else ([], None)
            try:
                with plan_applied(model, None, backend) if use_cache else nullcontext():
                    for s in range(0, W, batch_size):
                        ids = windows.input_ids[s : s + batch_size].to(device)
                        if use_cache:
                            logits = model(input_ids=ids, use_cache=False).logits.float()
                            teacher_logp.extend(F.log_softmax(logits / temperature, dim=-1).unbind(0))
                            del logits
                        else:  # online teacher: a forward of the converted model, for the prefix only
                            model(input_ids=ids, use_cache=False)
                        if prefix > 0:
                            prefix_h.extend(sink.pop().unbind(0))
            finally:
                if handle is not None:
                    handle.remove()
        if prefix > 0:
            # Check once that starting at layer ``prefix`` from inputs_embeds reproduces the full
            # forward of the converted model (not so for models that scale embeddings inside
            # forward, e.g. Gemma): otherwise run full forwards.
            ref = model(input_ids=windows.input_ids[:1].to(device), use_cache=False).logits.float()
            with skip_layers(layers, prefix):
                got = model(inputs_embeds=prefix_h[0][None], use_cache=False).logits.float()
            scale = float(ref.abs().max()) or 1.0
            if not torch.allclose(got, ref, rtol=0.0, atol=1e-3 * scale):
                prefix, prefix_h = 0, []
            del ref, got
    res.prefix_layers = prefix
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
    params = [p for n, p in pm.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in pm.named_parameters() if p.requires_grad)
    res.trainable_params = sum(p.numel() for p in params)
    inner = pm.base_model.model
    inner_layers = decoder_layers(inner)

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = [steps]
    warm = max(1, round(0.05 * steps)) if warmup is None else max(1, int(warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(schedule, total, warm))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def next_batch() -> list[int]:
        nonlocal order
        if len(order) < batch_size:  # new epoch: the rest of the old one first, then a fresh shuffle
            order = order + torch.randperm(W, generator=gen).tolist()
        b, order = order[:batch_size], order[batch_size:]
        return b

    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc="distill", unit="step", disable=not progress, leave=False)
    t_train = time.perf_counter()
    step = 0
    try:
        while step < total[0]:
            idx = next_batch()
            ids = windows.input_ids[idx].to(device)
            if use_cache:
                tlogp = torch.stack([teacher_logp[i] for i in idx]).to(device)
            else:
                with torch.no_grad(), pm.disable_adapter(), plan_applied(inner, None, backend):
                    tl = pm(input_ids=ids, use_cache=False).logits.float()
                    tlogp = F.log_softmax(tl / temperature, dim=-1)
                    del tl
            with skip_layers(inner_layers, prefix) if prefix else nullcontext():
                if prefix:
                    h = torch.stack([prefix_h[i] for i in idx])
                    logits = pm(inputs_embeds=h, use_cache=False).logits
                else:
                    logits = pm(input_ids=ids, use_cache=False).logits
            loss = _kl(logits.reshape(-1, V), tlogp.reshape(-1, V), temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            del logits, tlogp
            if max_grad_norm and max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            res.losses.append(float(loss.detach()))
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
        bar.close()
    res.train_seconds = time.perf_counter() - t_train
    res.steps = step
    res.settings["steps_run"] = step
    del teacher_logp, prefix_h
    for p in params:
        p.requires_grad_(False)  # inference from here on; lets the group take the fused path

    # ---- merge back into plain weights: the groups read the layers' modules when they run, so
    # once the LoRA wrappers are gone they take the fused path again on their own
    if merge:
        out = pm.merge_and_unload()
    else:
        out = pm
    if was_training:
        out.train()
    res.model = out

    if eval_windows is not None:
        res.after = evaluate(out, eval_windows, base_model=base_eval, batch_size=eval_batch_size,
                             progress=progress, backend=backend).to_dict()
    res.wall_seconds = time.perf_counter() - t_start
    return res


# ------------------------------------------------------------------------------------ CLI hooks
def add_distill_arguments(parser, default_steps: int = 0):
    """Add the ``--distill-*`` options to an argparse parser (group "distillation").

    ``default_steps=0`` means distillation is off unless ``--distill-steps N`` is given (for
    ``main``); a ``distill`` subcommand passes e.g. 200.
    """
    g = parser.add_argument_group("distillation (LoRA + KL to the unconverted model)")
    g.add_argument("--distill-steps", type=int, default=default_steps,
                   help=f"optimizer steps (default {default_steps}; 0: no distillation)")
    g.add_argument("--distill-lr", type=float, default=5e-4, help="AdamW learning rate (default 5e-4)")
    g.add_argument("--distill-rank", type=int, default=16, help="LoRA rank (default 16)")
    g.add_argument("--distill-alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    g.add_argument("--distill-target", choices=["grouped", "all"], default="grouped",
                   help="layers that get adapters (default grouped)")
    g.add_argument("--distill-batch-size", type=int, default=4, help="windows per step (default 4)")
    g.add_argument("--distill-seq-len", type=int, default=256, help="tokens per window (default 256)")
    g.add_argument("--distill-windows", type=int, default=64, help="distillation windows (default 64)")
    g.add_argument("--distill-text", default=None,
                   help="distillation text (default: the calibration text, else built-in calibration half)")
    g.add_argument("--distill-temperature", type=float, default=1.0, help="KL temperature (default 1)")
    g.add_argument("--distill-max-seconds", type=float, default=300.0,
                   help="training time budget in seconds; fewer steps if slower (default 300; 0: none)")
    g.add_argument("--distill-seed", type=int, default=0, help="LoRA init / window order seed (default 0)")
    g.add_argument("--distill-out", default=None, help="write the DistillResult JSON here")
    return parser


def run_distill_from_args(args, model, tokenizer, plan=None, eval_windows=None) -> DistillResult:
    """Distill ``model`` as the ``--distill-*`` options say; returns the DistillResult.

    ``model`` is converted in place to ``plan`` when it is not converted yet. The distillation text
    is ``--distill-text``, else ``args.calib_text`` / ``args.text`` when present, else the built-in
    calibration half. Writes ``--distill-out`` when given.
    """
    from .conversion import convert, get_plan
    from .texts import load_windows

    if get_plan(model) is None:
        if plan is None:
            raise ValueError("model is not converted and no plan was given")
        convert(model, plan, backend=getattr(args, "backend", "auto"))
    path = args.distill_text or getattr(args, "calib_text", None) or getattr(args, "text", None)
    windows = load_windows(tokenizer, path, split="calib", seq_len=args.distill_seq_len, max_windows=args.distill_windows)
    progress = not getattr(args, "no_progress", False)
    res = distill(
        model, windows, rank=args.distill_rank, alpha=args.distill_alpha, target=args.distill_target,
        steps=args.distill_steps, lr=args.distill_lr, batch_size=args.distill_batch_size,
        temperature=args.distill_temperature, seed=args.distill_seed,
        max_seconds=args.distill_max_seconds or None, eval_windows=eval_windows,
        eval_batch_size=getattr(args, "batch_size", 2), progress=progress,
    )
    res.settings["text"] = windows.to_dict()
    if args.distill_out:
        res.to_json(args.distill_out)
    return res
