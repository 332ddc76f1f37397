"""Training-free quality: a closed-form linear correction per CQIL group, folded into the weights.

A group of P layers with input ``h`` computes ``h + D`` with ``D = sum_j (a_j + m_j)`` (``a_j``
the attention output of layer j after o_proj, ``m_j`` its MLP output after down_proj, design.md
section 1); the sequential model computes ``y = layer_P(... layer_1(h))``. ``calibrate`` fits,
per group and on calibration tokens, a map ``A`` with ``h + A D ~ y``: ridge least squares
toward the identity,

    A = argmin sum_t w_t |g * (A D_t - (y_t - h_t))|^2 + lam |A - I|^2 = (C + lam I)(S + lam I)^-1,
    S = sum_t w_t D_t D_t^T,   C = sum_t w_t (y_t - h_t) D_t^T,

and folds it into the group's output projections: ``W_o,j <- A W_o,j`` and ``W_down,j <- A W_down,j``
(biases too). Same shapes, same kernels: zero latency cost. The fold is not exact (``a_j`` also
feeds layer j's MLP input, which now sees ``A a_j``); ``fold="mlp"`` folds into down_proj only,
which is exact, and the measured gap of the default is reported (``fold_gap``). The same idea
replaces pruned blocks in ReplaceMe (arXiv 2505.02819).

How it runs:

- Groups are calibrated in order. The input of a group is the calibration tokens' hidden state
  with every earlier group already converted and corrected (its folded weights in place); the
  target is the sequential output of the same layers from that same input.
- Everything goes through the model's own HF modules (layers, attention, MLP, norms), with the
  keyword arguments the model itself passes to each layer (masks, rotary embeddings), recorded by
  one cheap forward per chunk in which every layer is a recorder. No CQIL group code is used
  until the final ``convert``.
- Memory: the statistics are O(H^2) float64 per bypass candidate (``S``, ``C``; per-channel
  vectors with ``map="diagonal"``), whatever the number of tokens; activations are formed per
  chunk of ``batch_size`` windows and dropped. One [tokens, H] buffer holds the calibration
  tokens' input of the next group (in the model dtype, on ``offload_device``), so that the model
  runs once through its layers instead of once per group.
- The ridge strength (relative to the mean diagonal of ``S``) and, with ``bypass="search"``, the
  bypass distance d of each group are chosen on a held-back part of the calibration windows
  (``holdout``): the ridge by the closed-form held-back error, d by the held-back error of the
  group with the map folded in (computed exactly, without touching the weights). The final map
  is then fitted on all calibration windows with the chosen ridge.
- ``target="normalized"`` (default) weights each token by ``1 / mean(y_t^2)`` and each channel by
  the next layer's input-norm weight squared, i.e. it measures errors the way the next layer sees
  them (after its RMSNorm); ``"residual"`` fits the residual stream as it is, where the few
  tokens with very large activations dominate.

After ``calibrate`` the model is converted to ``result.plan`` (the groups with the chosen
bypass per group) and its o_proj/down_proj weights hold the corrections, so ``save_pretrained``
writes a plain checkpoint of the original shapes with the plan in config.json. ``revert`` then
gives the sequential model *with the corrected weights*, which is not the original model:
``keep_original=True`` keeps the original weights for ``result.restore(model)`` and
``result.sequential_original(model)``.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .conversion import convert, decoder_layers, get_plan, is_converted, revert
from .plan import CQILPlan

__all__ = [
    "calibrate",
    "CalibrationResult",
    "GroupCalibration",
    "correction_gains",
    "MAPS",
    "TARGETS",
    "FOLDS",
    "RIDGE_GRID",
    "CALIBRATION_KEY",
]

MAPS = ("full", "lowrank", "diagonal")
TARGETS = ("normalized", "residual")
FOLDS = ("both", "mlp")
#: ridge strengths tried, relative to the mean diagonal of S (chosen on held-back windows)
RIDGE_GRID = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
#: model.config key recording that (and how) the weights were calibrated
CALIBRATION_KEY = "cqil_calibration"


# ------------------------------------------------------------------------------------ results
@dataclass
class GroupCalibration:
    """What ``calibrate`` did for one group.

    Errors are relative: the weighted squared error of the group's output delta against the
    sequential delta ``y - h``, divided by the weighted energy of ``y - h`` (0 = exact, 1 = as bad
    as computing nothing). ``plain_error``, ``linear_error`` and ``corrected_error`` are measured on
    the held-back windows with the map fitted on the others; ``fit_error`` on all calibration
    windows with the final map.

    Attributes:
        group: layer indices.
        bypass: the chosen d.
        ridge: the chosen ridge strength relative to the mean diagonal of S (None: no map).
        corrected: False when no map beat the uncorrected group on the held-back windows (then
            the weights of this group are left as they were).
        plain_error: uncorrected CQIL with the chosen d.
        linear_error: with the map applied to the group's output delta (closed form).
        corrected_error: with the map folded into the weights (measured forward).
        fold_gap: ``corrected_error / linear_error - 1`` (0 for the exact ``fold="mlp"``).
        fit_error: final map, all calibration windows (closed form).
        candidates: per bypass d tried: ridge, plain/linear/corrected held-back errors.
        refits: per refit round: ridge, error before and after, accepted.
        tokens: calibration tokens used to fit / held back.
        seconds: wall time of this group.
        map: the fitted map (float32, CPU; [H, H], or [H] for ``map="diagonal"``) when
            ``keep_maps=True``, else None.
    """

    group: list
    bypass: int
    ridge: float | None
    corrected: bool
    plain_error: float | None
    linear_error: float | None
    corrected_error: float | None
    fold_gap: float | None
    fit_error: float
    candidates: list = field(default_factory=list)
    refits: list = field(default_factory=list)
    tokens: dict = field(default_factory=dict)
    seconds: float = 0.0
    map: torch.Tensor | None = None

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "map"}
        d["map_shape"] = list(self.map.shape) if self.map is not None else None
        return d


@dataclass
class CalibrationResult:
    """Result of ``calibrate``.

    Attributes:
        plan: the calibrated plan (the groups, the chosen bypass per group): the model runs it.
        groups: one GroupCalibration per parallel group, in order.
        settings: the arguments that shaped the fit (map, target, fold, ...), and the text.
        seconds: wall time; ``cpu_seconds``: CPU time of this process over it (all threads),
            which a machine shared with other jobs inflates less than the wall time.
        original_weights: ``{parameter name: CPU tensor}`` of every weight the fold changed, when
            ``keep_original=True`` (else None).
    """

    plan: CQILPlan
    groups: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    original_weights: dict | None = None
    cpu_seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "plan": self.plan.to_dict(),
            "groups": [g.to_dict() for g in self.groups],
            "settings": self.settings,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "kept_original": self.original_weights is not None,
        }

    def to_json(self, path=None, indent: int | None = 1) -> str:
        """The result as JSON (maps and weights are left out); also written to ``path``."""
        from .report import json_text

        return json_text(self.to_dict(), path, indent)

    def _originals(self, model) -> dict:
        if self.original_weights is None:
            raise ValueError("the original weights were not kept: calibrate(..., keep_original=True) keeps them")
        params = dict(model.named_parameters())
        missing = [n for n in self.original_weights if n not in params]
        if missing:
            raise ValueError(f"model has no parameters {missing[:3]}: is it the model that was calibrated?")
        return params

    def restore(self, model):
        """Give ``model`` back its original weights and make it sequential (the model as it was
        before ``calibrate``); returns it. Needs ``keep_original=True``."""
        params = self._originals(model)
        if is_converted(model):
            revert(model)
        with torch.no_grad():
            for name, w in self.original_weights.items():
                params[name].copy_(w)
        if hasattr(model.config, CALIBRATION_KEY):
            delattr(model.config, CALIBRATION_KEY)
        return model

    @contextmanager
    def sequential_original(self, model):
        """Inside the block, a calibrated layer computes with its original weights whenever it
        runs sequentially (not in a converted group), and with the corrected weights in its CQIL
        group. So the model reverted is the original model again, e.g. as the base of
        ``compare_plans`` / ``evaluate(base_model=model)`` or as ``distill``'s teacher, while the
        model converted to ``result.plan`` is the calibrated one. Forward hooks on the changed
        o_proj / down_proj modules; needs ``keep_original=True``.

        Example:
            >>> res = calibrate(model, plan, windows, keep_original=True)          # doctest: +SKIP
            >>> with res.sequential_original(model):                               # doctest: +SKIP
            ...     base, (cal,) = compare_plans(model, heldout, [res.plan])
        """
        params = self._originals(model)
        modules = dict(model.named_modules())
        layers = decoder_layers(model)
        index_of = {id(layer): i for i, layer in enumerate(layers)}
        handles = []

        def grouped(layer_index: int) -> bool:
            plan = get_plan(model)
            return plan is not None and any(layer_index in g for g in plan.parallel_groups)

        try:
            by_module: dict[str, dict] = {}
            for name, w in self.original_weights.items():
                mod_name, _, attr = name.rpartition(".")
                by_module.setdefault(mod_name, {})[attr] = w.to(params[name].device)
            for mod_name, originals in by_module.items():
                module = modules[mod_name]
                layer_index = next(index_of[id(m)] for n, m in modules.items()
                                   if id(m) in index_of and mod_name.startswith(n + "."))
                weight = originals.get("weight", module.weight)
                bias = originals.get("bias", module.bias)

                def hook(mod, args, output, weight=weight, bias=bias, layer_index=layer_index):
                    if grouped(layer_index):
                        return output
                    return torch.nn.functional.linear(args[0], weight, bias)

                handles.append(module.register_forward_hook(hook))
            yield model
        finally:
            for h in handles:
                h.remove()


# ------------------------------------------------------------------------------------ statistics
class _Moments:
    """Weighted second moments of a regressor R and a target Y over tokens, in float64.

    ``S = sum_t w_t R_t R_t^T`` and ``C = sum_t w_t Y_t R_t^T`` ([H, H]; their diagonals only, [H],
    when ``diagonal``), ``y = sum_t w_t Y_t^2`` per channel [H]. Shapes do not depend on the
    number of tokens: chunks are added and dropped.
    """

    def __init__(self, hidden: int, diagonal: bool, device):
        shape = (hidden,) if diagonal else (hidden, hidden)
        self.diagonal = diagonal
        self.S = torch.zeros(shape, dtype=torch.float64, device=device)
        self.C = torch.zeros(shape, dtype=torch.float64, device=device)
        self.y = torch.zeros(hidden, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, R: torch.Tensor, Y: torch.Tensor, w: torch.Tensor | None) -> None:
        """R, Y: [n, H] float64; w: [n] token weights or None."""
        Rw = R if w is None else R * w[:, None]
        if self.diagonal:
            self.S += (Rw * R).sum(0)
            self.C += (Rw * Y).sum(0)
        else:
            self.S += Rw.T @ R
            self.C += Y.T @ Rw
        self.y += (Y * Y).sum(0) if w is None else (w[:, None] * Y * Y).sum(0)
        self.tokens += R.shape[0]

    def merged(self, other: "_Moments") -> "_Moments":
        out = _Moments.__new__(_Moments)
        out.diagonal = self.diagonal
        out.S, out.C, out.y = self.S + other.S, self.C + other.C, self.y + other.y
        out.tokens = self.tokens + other.tokens
        return out

    def diag_S(self) -> torch.Tensor:
        return self.S if self.diagonal else self.S.diagonal()

    def diag_C(self) -> torch.Tensor:
        return self.C if self.diagonal else self.C.diagonal()

    def energy(self, g2: torch.Tensor) -> float:
        """Weighted energy of the target: the error of predicting 0."""
        return float((g2 * self.y).sum())

    def error(self, A: torch.Tensor | None, g2: torch.Tensor) -> float:
        """sum_t w_t |g * (A R_t - Y_t)|^2 in closed form; ``A=None`` is the identity."""
        if A is None:
            per = self.diag_S() - 2 * self.diag_C() + self.y
        elif A.dim() == 1:
            per = A * A * self.diag_S() - 2 * A * self.diag_C() + self.y
        else:
            per = ((A @ self.S) * A).sum(1) - 2 * (A * self.C).sum(1) + self.y
        return float((g2 * per).sum())

    def finite(self) -> bool:
        return bool(torch.isfinite(self.S).all() and torch.isfinite(self.C).all() and torch.isfinite(self.y).all())


def _fit_map(m: _Moments, ridge: float, kind: str, rank: int, g2: torch.Tensor) -> torch.Tensor | None:
    """The ridge map toward the identity for relative strength ``ridge`` (None if singular).

    full: ``A = (C + lam I)(S + lam I)^-1``; diagonal: ``a_i = (C_ii + lam) / (S_ii + lam)``;
    lowrank: ``I + B_r`` with ``B = A_full - I`` reduced to rank ``rank`` in the error metric
    (reduced-rank ridge regression: project B onto the top eigenvectors of the fitted values'
    covariance ``G B S B^T G``, G = diag(g)).
    """
    dS = m.diag_S()
    lam = ridge * float(dS.mean())
    if not lam > 0:
        return None
    if kind == "diagonal":
        return (m.C + lam) / (m.S + lam)
    H = m.S.shape[0]
    eye = torch.eye(H, dtype=m.S.dtype, device=m.S.device)
    L, info = torch.linalg.cholesky_ex(m.S + lam * eye)
    if int(info) != 0:
        return None
    A = torch.cholesky_solve((m.C + lam * eye).T, L).T  # S symmetric: A (S + lam I) = C + lam I
    if kind == "lowrank" and rank < H:
        B = A - eye
        g = g2.sqrt().clamp_min(1e-6 * float(g2.sqrt().max()))
        GB = g[:, None] * B
        _, vecs = torch.linalg.eigh(GB @ m.S @ GB.T)
        U = vecs[:, -rank:]
        A = eye + (U @ (U.T @ GB)) / g[:, None]
    return A


def _choose_ridge(fit: _Moments, held: _Moments, kind: str, rank: int, g2, grid) -> tuple[float | None, torch.Tensor | None, float]:
    """The grid ridge whose map (fitted on ``fit``) has the lowest closed-form error on ``held``."""
    best = (None, None, math.inf)
    for ridge in grid:
        A = _fit_map(fit, ridge, kind, rank, g2)
        if A is None:
            continue
        e = held.error(A, g2)
        if e < best[2]:
            best = (ridge, A, e)
    return best


def _compose(A2: torch.Tensor, A: torch.Tensor | None) -> torch.Tensor:
    """The map of folding ``A`` first, then ``A2``."""
    if A is None:
        return A2
    if A2.dim() == 1 and A.dim() == 1:
        return A2 * A
    A2m = torch.diag(A2) if A2.dim() == 1 else A2
    Am = torch.diag(A) if A.dim() == 1 else A
    return A2m @ Am


def _apply(A: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x [..., H] (float64) -> A x per token."""
    if A is None:
        return x
    return x * A if A.dim() == 1 else x @ A.T


# ------------------------------------------------------------------------------------ the model's own modules
def _unwrap(out):
    return out[0] if isinstance(out, tuple) else out


def _layer_owner(model) -> nn.Module:
    """The module whose forward iterates the decoder layers (``model.model`` for a causal LM)."""
    layers = decoder_layers(model)
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and getattr(inner, "layers", None) is layers:
        return inner
    return model


_MISSING = object()


@torch.no_grad()
def _record_layer_inputs(model, ids: torch.Tensor):
    """One forward of the base model with every decoder layer replaced by a recorder.

    Returns the embeddings entering layer 0 ([b, T, H]) and, per layer, the (args, kwargs) the
    model passes it besides the hidden states (attention mask of its type, rotary embeddings,
    position ids, ...). No layer computes: the cost is the embedding, masks and rotary tables.
    """
    layers = decoder_layers(model)
    owner = _layer_owner(model)
    calls: list = [None] * len(layers)
    first: list = []
    saved = []

    def recorder(index):
        def forward(hidden_states, *args, **kwargs):
            if index == 0:
                first.append(hidden_states)
            calls[index] = (args, kwargs)
            from .compat import layer_output

            return layer_output(hidden_states)

        return forward

    try:
        for i, layer in enumerate(layers):
            saved.append(layer.__dict__.get("forward", _MISSING))
            layer.forward = recorder(i)  # instance attribute: nn.Module.__call__ runs it
        owner(input_ids=ids, use_cache=False)
    finally:
        for layer, old in zip(layers, saved):
            if old is _MISSING:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = old
    if not first or any(c is None for c in calls):
        raise TypeError(f"{type(model).__name__} did not call every decoder layer in its forward: cannot calibrate it")
    return first[0], calls


def _attn_kwargs(call) -> dict:
    args, kwargs = call
    if args:
        raise TypeError("the model passes positional arguments to its decoder layers: unsupported transformers version")
    return {k: v for k, v in kwargs.items() if k != "use_cache"}


def _attention_outputs(layers, h, calls) -> list:
    """a_j = Attn_j(RMSNorm_in_j(h)) for each layer of a group: P x [b, T, H] (model dtype)."""
    out = []
    for layer, call in zip(layers, calls):
        a = layer.self_attn(hidden_states=layer.input_layernorm(h), **_attn_kwargs(call))
        out.append(_unwrap(a))
    return out


def _group_parts(layers, h, calls, attn, bypass: int, A, fold: str):
    """The group's output delta as ``F + R`` (float64 [n, H]) with ``A`` folded in (None: no map).

    fold "both": a'_j = A a_j; u_j = h + a'_j + sum_{i=1..min(d,j)} a'_{j-i};
    delta = A sum_j (a_j + MLP_j(norm_j(u_j))): F = 0, R = delta.
    fold "mlp": u_j = h + a_j + bypass; delta = sum_j a_j + A sum_j m_j: F = sum a, R = A sum m.
    """
    H = h.shape[-1]
    dt = h.dtype
    flat = lambda t: t.reshape(-1, H).double()  # noqa: E731
    if fold == "both" and A is not None:
        shape = h.shape
        folded = [_apply(A, flat(a)).to(dt).reshape(shape) for a in attn]
    else:
        folded = attn
    total_m = None
    for j, layer in enumerate(layers):
        u = h + folded[j]
        for i in range(1, min(bypass, j) + 1):
            u = u + folded[j - i]
        m = flat(layer.mlp(layer.post_attention_layernorm(u)))
        total_m = m if total_m is None else total_m + m
    total_a = sum(flat(a) for a in attn)
    if fold == "both":
        return None, _apply(A, total_a + total_m)
    return total_a, _apply(A, total_m)


def _sequential(layers, h, calls):
    for layer, (args, kwargs) in zip(layers, calls):
        h = _unwrap(layer(h, *args, **kwargs))
    return h


def _next_norm_weight(model, end: int) -> torch.Tensor | None:
    """The RMSNorm weight the layer after ``end`` applies to its input (the final norm at the end)."""
    layers = decoder_layers(model)
    if end + 1 < len(layers):
        norm = getattr(layers[end + 1], "input_layernorm", None)
    else:
        norm = getattr(_layer_owner(model), "norm", None)
    w = getattr(norm, "weight", None)
    return w.detach() if isinstance(w, torch.Tensor) else None


# ------------------------------------------------------------------------------------ one pass
@dataclass
class _Options:
    map: str
    rank: int
    target: str
    fold: str
    ridge: float | None
    grid: tuple
    refit: int
    batch_size: int


class _Chunks:
    """Calibration windows in chunks, and the hidden state entering the next group per chunk."""

    def __init__(self, windows, fit_idx: list, held_idx: list, batch_size: int, device, offload):
        self.ids = windows.input_ids
        self.device = device
        self.offload = offload
        self.fit = [fit_idx[i : i + batch_size] for i in range(0, len(fit_idx), batch_size)]
        self.held = [held_idx[i : i + batch_size] for i in range(0, len(held_idx), batch_size)]
        self.frontier: dict = {}  # chunk key -> [b, T, H] hidden state entering layer ``self.layer``
        self.layer = 0

    def keys(self, part: str = "all"):
        fit = [("fit", i) for i in range(len(self.fit))]
        held = [("held", i) for i in range(len(self.held))]
        return fit + held if part == "all" else fit if part == "fit" else held

    def input_ids(self, key) -> torch.Tensor:
        part, i = key
        idx = (self.fit if part == "fit" else self.held)[i]
        return self.ids[idx].to(self.device)

    def hidden(self, key) -> torch.Tensor:
        return self.frontier[key].to(self.device)

    def set_hidden(self, key, h: torch.Tensor) -> None:
        self.frontier[key] = h.to(self.offload)


def _token_weights(y: torch.Tensor, target: str) -> torch.Tensor | None:
    if target == "residual":
        return None
    ms = y.double().pow(2).mean(-1).reshape(-1)
    return 1.0 / ms.clamp_min(1e-12)


def _collect(model, layers, group, chunks: _Chunks, keys, variants, opts: _Options, progress) -> list:
    """One pass over ``keys``: moments of every variant (bypass d, map A) of the group.

    For variant (d, A), R and the target Y = (y - h) - F describe the group's output with A folded
    in: the identity error of these moments is the error of the folded group.
    """
    H = layers[group[0]].self_attn.o_proj.out_features
    device = chunks.device
    members = [layers[i] for i in group]
    moments = [_Moments(H, opts.map == "diagonal", device) for _ in variants]
    for key in keys:
        ids = chunks.input_ids(key)
        _, calls = _record_layer_inputs(model, ids)
        calls = calls[group[0] : group[-1] + 1]
        h = chunks.hidden(key)
        y = _sequential(members, h, calls)
        target = (y - h).reshape(-1, H).double()
        w = _token_weights(y, opts.target)
        attn = _attention_outputs(members, h, calls)
        for m, (d, A) in zip(moments, variants):
            F, R = _group_parts(members, h, calls, attn, d, A, opts.fold)
            m.add(R, target if F is None else target - F, w)
        progress.update(1)
        del y, target, attn
    return moments


def _advance(model, layers, chunks: _Chunks, start: int, stop: int, group=None, bypass: int = 0, fold="both", progress=None):
    """Move every chunk's hidden state from layer ``start`` to layer ``stop``: through ``group``
    (CQIL semantics with its current weights) when given, then the sequential layers."""
    for key in chunks.keys():
        ids = chunks.input_ids(key)
        emb, calls = _record_layer_inputs(model, ids)
        h = chunks.hidden(key) if key in chunks.frontier else emb
        first = start
        if group is not None:
            members = [layers[i] for i in group]
            gcalls = calls[group[0] : group[-1] + 1]
            attn = _attention_outputs(members, h, gcalls)
            F, R = _group_parts(members, h, gcalls, attn, bypass, None, fold)
            delta = R if F is None else F + R
            h = h + delta.reshape(h.shape).to(h.dtype)
            first = group[-1] + 1
        for i in range(first, stop):
            h = _unwrap(layers[i](h, *calls[i][0], **calls[i][1]))
        chunks.set_hidden(key, h)
        if progress is not None:
            progress.update(1)
    chunks.layer = stop


def _rel(e: float | None, energy: float) -> float | None:
    if e is None:
        return None
    return e / energy if energy > 0 else 0.0


def _candidate_maps(model, layers, group, ds, chunks: _Chunks, opts: _Options, g2, progress):
    """Every bypass candidate d: its moments, the ridge chosen on the held-back chunks, the map
    fitted on the fit chunks, and its held-back errors (plain, linear, folded).

    Returns (candidates, fitted {d: (ridge, map)}, fit moments, held moments) per d in ``ds``.
    """
    has_held = len(chunks.held) > 0
    fit_m = _collect(model, layers, group, chunks, chunks.keys("fit"), [(d, None) for d in ds], opts, progress)
    held_m = (_collect(model, layers, group, chunks, chunks.keys("held"), [(d, None) for d in ds], opts, progress)
              if has_held else None)
    for m in fit_m + (held_m or []):
        if not m.finite():
            raise ValueError(f"group {list(group)}: non-finite activations on the calibration windows")
    candidates, fitted = [], {}
    for k, d in enumerate(ds):
        fm = fit_m[k]
        if float(fm.diag_S().sum()) == 0.0:
            warnings.warn(f"group {list(group)}: its layers' outputs are zero on the calibration tokens; no correction")
            candidates.append({"bypass": d, "ridge": None})
            continue
        if opts.ridge is not None:
            ridge, A = opts.ridge, _fit_map(fm, opts.ridge, opts.map, opts.rank, g2)
            if A is None:
                raise ValueError(
                    f"group {list(group)}: the system for ridge {opts.ridge} is singular; use a larger ridge "
                    "or ridge=None (chosen on held-back windows)"
                )
            lin = held_m[k].error(A, g2) if has_held else None
        else:
            ridge, A, lin = _choose_ridge(fm, held_m[k], opts.map, opts.rank, g2, opts.grid)
            if A is None:
                warnings.warn(f"group {list(group)} d={d}: every ridge system was singular; no correction for this d")
        fitted[d] = (ridge, A)
        energy = held_m[k].energy(g2) if has_held else fm.energy(g2)
        plain = held_m[k].error(None, g2) if has_held else fm.error(None, g2)
        candidates.append({"bypass": d, "ridge": ridge, "plain_error": _rel(plain, energy),
                           "linear_error": _rel(lin, energy), "corrected_error": None, "_energy": energy})

    # the folded group, measured on the held-back chunks (no weight is touched: A is applied
    # to the attention outputs and the delta, which is what the folded weights compute)
    measured = [(d, fitted[d][1]) for d in ds if d in fitted and fitted[d][1] is not None]
    if has_held and measured:
        folded_m = _collect(model, layers, group, chunks, chunks.keys("held"), measured, opts, progress)
        for (d, _), m in zip(measured, folded_m):
            c = next(c for c in candidates if c["bypass"] == d)
            c["corrected_error"] = _rel(m.error(None, g2), c["_energy"])
    for c in candidates:
        c.pop("_energy", None)
    return candidates, fitted, fit_m, held_m


def _choose(candidates, fitted, has_held: bool) -> tuple[dict, bool]:
    """The candidate with the lowest held-back error of the folded group, or of the plain group
    when no map helps; and whether to use its map."""

    def score(c):
        if not has_held and c.get("ridge") is not None:
            return 0.0  # nothing to choose with: the one d, corrected
        options = [v for v in (c.get("corrected_error"), c.get("plain_error")) if v is not None]
        return min(options) if options else math.inf

    best = min(candidates, key=lambda c: (score(c), c["bypass"]))
    d = best["bypass"]
    use_map = best.get("ridge") is not None and fitted.get(d, (None, None))[1] is not None and (
        not has_held or (best["corrected_error"] is not None and best["corrected_error"] < best["plain_error"]))
    return best, use_map


def _refit_rounds(model, layers, group, d, A, ridge, chunks: _Chunks, opts: _Options, g2, progress):
    """Refit on the group's output with ``A`` folded in, composing maps; a round is kept only when
    its map (fitted on the fit chunks) lowers the held-back error. Returns (A, fit_error, log)."""
    has_held = len(chunks.held) > 0
    log, fit_error = [], None
    for r in range(opts.refit):
        rf = _collect(model, layers, group, chunks, chunks.keys("fit"), [(d, A)], opts, progress)[0]
        rh = (_collect(model, layers, group, chunks, chunks.keys("held"), [(d, A)], opts, progress)[0]
              if has_held else None)
        if has_held and opts.ridge is None:
            ridge2, A2fit, lin2 = _choose_ridge(rf, rh, opts.map, opts.rank, g2, opts.grid)
        else:
            ridge2 = opts.ridge if opts.ridge is not None else ridge
            A2fit = _fit_map(rf, ridge2, opts.map, opts.rank, g2)
            lin2 = rh.error(A2fit, g2) if has_held and A2fit is not None else None
        before = rh.error(None, g2) if has_held else None
        accept = A2fit is not None and (not has_held or lin2 < before)
        entry = {"round": r + 1, "ridge": ridge2, "accepted": bool(accept)}
        if has_held:
            e = rh.energy(g2)
            entry.update(error_before=_rel(before, e), linear_error=_rel(lin2, e))
        log.append(entry)
        if not accept:
            break
        all_r = rf.merged(rh) if has_held else rf
        A2 = _fit_map(all_r, ridge2, opts.map, opts.rank, g2)
        if A2 is None:
            break
        A = _compose(A2, A)
        fit_error = _rel(all_r.error(A2, g2), all_r.energy(g2))
    return A, fit_error, log


def _fit_group(model, layers, group, plan_d: int, search_bypass: bool, chunks: _Chunks, opts: _Options, g2, progress):
    """Choose d and the ridge on the held-back chunks, fit the final map on all chunks.

    Returns (GroupCalibration without timing, map or None). Nothing is changed in the model.
    """
    ds = list(range(len(group))) if search_bypass else [plan_d]
    has_held = len(chunks.held) > 0
    candidates, fitted, fit_m, held_m = _candidate_maps(model, layers, group, ds, chunks, opts, g2, progress)
    best, use_map = _choose(candidates, fitted, has_held)
    d, k = best["bypass"], ds.index(best["bypass"])
    all_m = fit_m[k].merged(held_m[k]) if has_held else fit_m[k]
    A = _fit_map(all_m, fitted[d][0], opts.map, opts.rank, g2) if use_map else None
    if use_map and A is None:
        warnings.warn(f"group {list(group)}: the final system is singular; no correction")
        use_map = False
    fit_error = _rel(all_m.error(A, g2), all_m.energy(g2))
    refits = []
    if use_map and opts.refit:
        A, refit_error, refits = _refit_rounds(model, layers, group, d, A, fitted[d][0], chunks, opts, g2, progress)
        fit_error = refit_error if refit_error is not None else fit_error
    gap = None
    if use_map and best.get("corrected_error") is not None and best.get("linear_error"):
        gap = best["corrected_error"] / best["linear_error"] - 1.0
    info = GroupCalibration(
        group=list(group), bypass=d, ridge=fitted[d][0] if use_map else None, corrected=bool(use_map),
        plain_error=best.get("plain_error"), linear_error=best.get("linear_error") if use_map else None,
        corrected_error=best.get("corrected_error") if use_map else None, fold_gap=gap,
        fit_error=fit_error, candidates=candidates, refits=refits,
        tokens={"fit": fit_m[k].tokens, "held": held_m[k].tokens if has_held else 0},
    )
    return info, A


# ------------------------------------------------------------------------------------ folding
def _fold_targets(layer, fold: str) -> list:
    mods = [layer.mlp.down_proj] if fold == "mlp" else [layer.self_attn.o_proj, layer.mlp.down_proj]
    return mods


@torch.no_grad()
def _fold(layers, group, A: torch.Tensor, fold: str) -> None:
    """W <- A W (and b <- A b) in place on the existing parameters of the group's projections."""
    for i in group:
        for mod in _fold_targets(layers[i], fold):
            for p in (mod.weight, mod.bias):
                if p is None:
                    continue
                src = p.detach().double()
                new = (A[:, None] * src if src.dim() == 2 else A * src) if A.dim() == 1 else A @ src
                p.copy_(new.to(p.dtype))


def _touched_params(model, group, fold: str) -> dict:
    """``{name: Parameter}`` of every weight folding ``group`` changes."""
    layers = decoder_layers(model)
    wanted = {id(p) for i in group for mod in _fold_targets(layers[i], fold) for p in (mod.weight, mod.bias)
              if p is not None}
    return {n: p for n, p in model.named_parameters() if id(p) in wanted}


# ------------------------------------------------------------------------------------ validation
def _check_option(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _as_windows(data, tokenizer, seq_len, max_windows):
    from .texts import TokenWindows, make_windows

    if isinstance(data, TokenWindows):
        return data
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, str) for t in data):
        data = "\n\n".join(data)
    if isinstance(data, str):
        if tokenizer is None:
            raise ValueError("calibrating on raw text needs a tokenizer (or pass TokenWindows)")
        return make_windows(tokenizer, data, seq_len=seq_len, max_windows=max_windows, source="text")
    raise TypeError(f"windows must be TokenWindows, a string or a list of strings, got {type(data).__name__}")


def _held_indices(num_windows: int, fraction: float) -> list[int]:
    """Evenly spaced held-back windows (the windows are spread over the text)."""
    if fraction <= 0:
        return []
    n = min(num_windows - 1, max(1, round(num_windows * fraction)))
    return sorted({int((k + 0.5) * num_windows / n) for k in range(n)})


def _resolve_plan(model, plan):
    from .conversion import CONFIG_KEY

    current = get_plan(model)
    if plan is None:
        plan = current if current is not None else getattr(getattr(model, "config", None), CONFIG_KEY, None)
        if plan is None:
            raise ValueError("no plan given, and the model is neither converted nor has a plan in its config")
    if isinstance(plan, dict):
        plan = CQILPlan.from_dict(plan)
    if not isinstance(plan, CQILPlan):
        raise TypeError(f"plan must be a CQILPlan or a dict {{'groups': ..., 'bypass': ...}}, got {type(plan).__name__}")
    if current is not None and current.parallel_groups != plan.parallel_groups:
        raise ValueError(
            f"model is converted with groups {[list(g) for g in current.parallel_groups]}, not the plan's "
            f"{[list(g) for g in plan.parallel_groups]}: call cqil_kernels.revert(model) first"
        )
    return plan, current


def _validate_model(model, plan: CQILPlan, backend: str):
    from .backends import resolve_backend
    from .conversion import _check_group
    from .families import family_of_layer

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module from transformers, got {type(model).__name__}")
    layers = decoder_layers(model)
    plan.validate_for(len(layers))
    for layer in layers:
        family_of_layer(layer)
    for group in plan.parallel_groups:
        _check_group(model, layers, group)
        for i in group:
            for mod in (layers[i].self_attn.o_proj, layers[i].mlp.down_proj):
                if type(mod) is not nn.Linear:
                    raise TypeError(
                        f"layer {i}: {type(mod).__name__} projection (not nn.Linear, e.g. a LoRA wrapper): "
                        "merge adapters (merge_and_unload) before calibrating"
                    )
                if not mod.weight.is_floating_point():
                    raise TypeError(f"layer {i}: weights of dtype {mod.weight.dtype} cannot be corrected in place")
    device = next(model.parameters()).device
    return layers, device, resolve_backend(backend, device)


# ------------------------------------------------------------------------------------ public API
def calibrate(
    model,
    plan: CQILPlan | dict | None,
    windows,
    tokenizer=None,
    *,
    map: str = "full",
    rank: int = 64,
    target: str = "normalized",
    fold: str = "both",
    bypass: str = "search",
    ridge: float | None = None,
    ridge_grid=RIDGE_GRID,
    refit: int = 0,
    holdout: float = 0.25,
    batch_size: int = 2,
    seq_len: int = 512,
    max_windows: int | None = None,
    keep_original: bool = False,
    keep_maps: bool = False,
    offload_device=None,
    backend: str = "auto",
    progress: bool = True,
) -> CalibrationResult:
    """Fit a linear correction per group of ``plan``, fold it into the weights, convert ``model``.

    Args:
        model: a HF Llama/Mistral/Qwen2/Qwen3 causal LM, sequential, or converted with the same
            groups (then it is reverted for the fit). Changed in place.
        plan: the groups (and bypass, used with ``bypass="plan"``); None: the model's own plan.
        windows: calibration ``TokenWindows`` [W, T] (or text with ``tokenizer``, cut into
            ``max_windows`` windows of ``seq_len`` tokens). Every position is a sample.
        map: ``"full"`` (H x H, default), ``"lowrank"`` (identity + rank ``rank``) or
            ``"diagonal"`` (per channel; its statistics are [H] vectors, for very large H).
        target: ``"normalized"`` (errors as the next layer's RMSNorm sees them, default) or
            ``"residual"`` (the residual stream as it is).
        fold: ``"both"`` (o_proj and down_proj; default) or ``"mlp"`` (down_proj only: exact,
            the map acts on the MLP outputs alone).
        bypass: ``"search"`` (try d = 0..P-1 per group, keep the best on held-back windows after
            correction; default) or ``"plan"`` (the plan's own d per group).
        ridge: ridge strength relative to the mean diagonal of S; None (default) chooses it from
            ``ridge_grid`` on the held-back windows.
        refit: extra fits per group on the group's output with the map folded in (each composes
            a new map with the previous one; kept only when it lowers the held-back error).
        holdout: fraction of the windows held back to choose the ridge and d (evenly spaced over
            the text; the final map is fitted on all windows). 0 needs ``ridge`` given and
            ``bypass="plan"``.
        batch_size: windows per chunk (activations exist for one chunk at a time).
        keep_original: keep a CPU copy of every changed weight in ``result.original_weights``
            (for ``result.restore`` and ``result.sequential_original``).
        keep_maps: keep each group's map in ``result.groups[i].map``.
        offload_device: where the [tokens, H] buffer of next-group inputs lives (None: the
            model's device; "cpu" keeps it off an accelerator).
        backend: backend of the final ``convert``.
        progress: a tqdm bar over chunk passes.

    Returns:
        CalibrationResult: ``.plan`` (with the chosen bypass per group), per-group choices and
        errors (``.groups``), settings, seconds. The model is converted to ``.plan`` and its
        config records the calibration under ``"cqil_calibration"``; ``revert`` afterwards gives
        the sequential model with the corrected weights (not the original).

    Raises:
        TypeError / ValueError: bad arguments, an unsupported model, a plan that does not fit
        it or differs from the model's conversion, too few calibration tokens for H (full and
        low-rank maps need at least H fit tokens), non-finite activations. Nothing is changed
        when an error is raised: arguments are checked first, and should the fit fail later the
        changed weights are restored from a copy and the model's conversion state is restored.

    Example:
        >>> calib = load_windows(tok, "calib.txt", seq_len=512, max_windows=16)   # doctest: +SKIP
        >>> res = calibrate(model, CQILPlan([[14, 15], [22, 23]]), calib)        # doctest: +SKIP
        >>> res.plan, [g.corrected_error for g in res.groups]                     # doctest: +SKIP
        >>> model.save_pretrained("calibrated")   # plain weights + the plan      # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    t_start, cpu_start = time.perf_counter(), time.process_time()
    # ---- check everything first
    for name, value, choices in (("map", map, MAPS), ("target", target, TARGETS), ("fold", fold, FOLDS),
                                 ("bypass", bypass, ("search", "plan"))):
        _check_option(name, value, choices)
    rank = _int_arg("rank", rank, 1)
    refit = _int_arg("refit", refit, 0)
    batch_size = _int_arg("batch_size", batch_size, 1)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    if ridge is not None and (isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0
                              or not math.isfinite(ridge)):
        raise ValueError(f"ridge must be a number > 0 (relative to the mean diagonal of S) or None, got {ridge!r}")
    grid = tuple(float(r) for r in ridge_grid)
    if not grid or any(not r > 0 or not math.isfinite(r) for r in grid):
        raise ValueError(f"ridge_grid must be numbers > 0, got {ridge_grid!r}")
    plan, current = _resolve_plan(model, plan)
    layers, device, backend_used = _validate_model(model, plan, backend)
    if not plan.parallel_groups:
        raise ValueError(f"plan {plan} has no group of 2 or more layers: nothing to calibrate")
    windows = _as_windows(windows, tokenizer, seq_len, max_windows)
    W, T = windows.input_ids.shape
    held_idx = _held_indices(W, holdout) if W > 1 else []
    needs_held = ridge is None or bypass == "search"
    if needs_held and not held_idx:
        raise ValueError(
            f"choosing the ridge or the bypass needs windows held back: got {W} window(s) and holdout={holdout}; "
            "give at least 2 windows and holdout > 0, or ridge=... and bypass='plan'"
        )
    fit_idx = [i for i in range(W) if i not in set(held_idx)]
    H = layers[plan.parallel_groups[0][0]].self_attn.o_proj.out_features
    fit_tokens = len(fit_idx) * T
    if map in ("full", "lowrank") and fit_tokens < H:
        raise ValueError(
            f"{fit_tokens} calibration tokens to fit ({len(fit_idx)} windows x {T}, {len(held_idx)} more held "
            f"back) are fewer than the hidden size H={H}: the {map} map is under-determined; give more or longer "
            "windows, or map='diagonal'"
        )
    if map == "lowrank" and rank >= H:
        raise ValueError(f"rank must be < H={H} for map='lowrank' (use map='full'), got {rank}")
    if getattr(model.config, CALIBRATION_KEY, None) is not None:
        warnings.warn("the model was already calibrated: this fit starts from the corrected weights")
    opts = _Options(map=map, rank=rank, target=target, fold=fold, ridge=None if ridge is None else float(ridge),
                    grid=grid, refit=refit, batch_size=batch_size)
    offload = torch.device(offload_device) if offload_device is not None else device

    # ---- then compute, keeping a copy of every weight before it changes
    was_training = model.training
    current_backend = getattr(model, "_cqil_backend", backend_used)
    saved: dict = {}  # name -> CPU copy of the original
    groups_out: list[GroupCalibration] = []
    chosen = list(plan.bypasses)
    group_index = {g: i for i, g in enumerate(plan.groups)}
    chunks = _Chunks(windows, fit_idx, held_idx, batch_size, device, offload)
    n_chunks = len(chunks.keys())
    passes_per_group = 2 + (1 if needs_held else 0) + 2 * refit + 1
    bar = tqdm(total=n_chunks * (1 + passes_per_group * len(plan.parallel_groups)), desc="calibrating",
               unit="chunk", disable=not progress, leave=False)
    try:
        if current is not None:
            revert(model)
        model.eval()
        with torch.no_grad():
            parallel = list(plan.parallel_groups)
            _advance(model, layers, chunks, 0, parallel[0][0], progress=bar)
            for gi, group in enumerate(parallel):
                t0 = time.perf_counter()
                w = _next_norm_weight(model, group[-1]) if target == "normalized" else None
                g2 = (w.double().pow(2) if w is not None else torch.ones(H, dtype=torch.float64)).to(device)
                pi = group_index[group]
                info, A = _fit_group(model, layers, group, plan.bypass_of(pi), bypass == "search", chunks, opts,
                                     g2, bar)
                if A is not None:
                    for name, p in _touched_params(model, group, fold).items():
                        saved[name] = p.detach().to("cpu", copy=True)
                    _fold(layers, group, A, fold)
                chosen[pi] = info.bypass
                nxt = parallel[gi + 1][0] if gi + 1 < len(parallel) else None
                if nxt is not None:
                    _advance(model, layers, chunks, group[0], nxt, group=group, bypass=info.bypass, fold=fold,
                             progress=bar)
                info.seconds = time.perf_counter() - t0
                if keep_maps and A is not None:
                    info.map = A.float().cpu()
                groups_out.append(info)
        chunks.frontier.clear()
        final = CQILPlan(plan.groups, bypass=chosen)
        convert(model, final, backend=backend_used)
    except BaseException:
        # leave the model exactly as it was: weights back from the copies, conversion state back
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, w in saved.items():
                params[name].copy_(w)
        if is_converted(model):
            revert(model)
        if current is not None:
            convert(model, current, backend=current_backend)
        raise
    finally:
        bar.close()
        model.train(was_training)

    settings = {
        "map": map, "rank": rank if map == "lowrank" else None, "target": target, "fold": fold, "bypass": bypass,
        "ridge": ridge, "ridge_grid": list(grid), "refit": refit, "holdout": holdout, "batch_size": batch_size,
        "text": windows.to_dict(), "fit_windows": len(fit_idx), "held_windows": len(held_idx),
    }
    setattr(model.config, CALIBRATION_KEY, {
        "plan": final.to_dict(), "map": map, "target": target, "fold": fold,
        "ridge": [g.ridge for g in groups_out], "tokens": W * T, "text": windows.source,
    })
    return CalibrationResult(
        plan=final, groups=groups_out, settings=settings, seconds=time.perf_counter() - t_start,
        original_weights=saved if keep_original else None, cpu_seconds=time.process_time() - cpu_start,
    )


@torch.no_grad()
def correction_gains(
    model,
    windows,
    groups,
    *,
    map: str = "full",
    rank: int = 64,
    target: str = "normalized",
    fold: str = "both",
    bypass: str = "search",
    plan_bypass: int = 0,
    ridge: float | None = None,
    ridge_grid=RIDGE_GRID,
    holdout: float = 0.25,
    batch_size: int = 2,
    offload_device=None,
    progress: bool = True,
) -> dict:
    """How much the correction would help each group *alone*, without changing the model.

    Every group is fitted as ``calibrate`` fits it (same options), from the sequential model's
    input of its first layer (one pass through the layers serves all groups, also overlapping
    ones), and its held-back errors are measured; nothing is folded.

    Args:
        groups: candidate groups (lists of consecutive layer indices; may overlap).
        plan_bypass: the d used with ``bypass="plan"``.
        Other arguments: as in ``calibrate``.

    Returns:
        ``{tuple(group): GroupCalibration}``; ``candidates`` hold the plain and corrected
        held-back errors of every d tried, so ``corrected_error / plain_error`` is the factor by
        which the correction shrinks the group's (weighted squared) output error.

    Example:
        >>> gains = correction_gains(model, calib, [(20, 21), (22, 23)])          # doctest: +SKIP
        >>> {g: r.corrected_error / r.plain_error for g, r in gains.items()}      # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    for name, value, choices in (("map", map, MAPS), ("target", target, TARGETS), ("fold", fold, FOLDS),
                                 ("bypass", bypass, ("search", "plan"))):
        _check_option(name, value, choices)
    groups = sorted({tuple(int(i) for i in g) for g in groups})
    for g in groups:
        CQILPlan([list(g)], bypass=plan_bypass if bypass == "plan" else 0)
    if is_converted(model):
        raise ValueError("correction_gains needs the sequential model: call cqil_kernels.revert(model) first")
    layers, device, _ = _validate_model(model, CQILPlan(), "torch")
    for g in groups:
        CQILPlan([list(g)]).validate_for(len(layers))
        _validate_model(model, CQILPlan([list(g)]), "torch")
    windows = _as_windows(windows, None, 0, None)
    W, T = windows.input_ids.shape
    held_idx = _held_indices(W, holdout) if W > 1 else []
    if not held_idx:
        raise ValueError(f"correction_gains measures on held-back windows: need >= 2 windows and holdout > 0, got {W}")
    fit_idx = [i for i in range(W) if i not in set(held_idx)]
    H = layers[0].self_attn.o_proj.out_features
    if map in ("full", "lowrank") and len(fit_idx) * T < H:
        raise ValueError(f"{len(fit_idx) * T} fit tokens are fewer than H={H}; give more windows or map='diagonal'")
    opts = _Options(map=map, rank=_int_arg("rank", rank, 1), target=target, fold=fold, ridge=ridge,
                    grid=tuple(float(r) for r in ridge_grid), refit=0, batch_size=_int_arg("batch_size", batch_size, 1))
    chunks = _Chunks(windows, fit_idx, held_idx, batch_size, device,
                     torch.device(offload_device) if offload_device is not None else device)
    starts = sorted({g[0] for g in groups})
    per_group = 3 if bypass == "search" or ridge is None else 2
    bar = tqdm(total=len(chunks.keys()) * (len(starts) + per_group * len(groups)), desc="correction gains",
               unit="chunk", disable=not progress, leave=False)
    out = {}
    was_training = model.training
    try:
        model.eval()
        position = 0
        for s in starts:
            _advance(model, layers, chunks, position, s, progress=bar)
            position = s
            for g in (g for g in groups if g[0] == s):
                t0 = time.perf_counter()
                w = _next_norm_weight(model, g[-1]) if target == "normalized" else None
                g2 = (w.double().pow(2) if w is not None else torch.ones(H, dtype=torch.float64)).to(device)
                info, _ = _fit_group(model, layers, g, plan_bypass, bypass == "search", chunks, opts, g2, bar)
                info.seconds = time.perf_counter() - t0
                out[g] = info
    finally:
        bar.close()
        model.train(was_training)
    return out
