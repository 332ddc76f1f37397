"""Convert a HuggingFace Llama-family model to CQIL groups in place, and back.

Conversion changes no module tree: every decoder layer stays at its index in
``model.model.layers`` with its parameter names. The layers of a group get a subclass of their own
class (``CQILLlamaDecoderLayer`` for ``LlamaDecoderLayer``) whose forward runs the whole group in
the leader and passes the input through in the followers; ``revert`` restores the class.
Everything is checked before anything changes, so a failed ``convert`` leaves the model as it was.
"""

from __future__ import annotations

from torch import nn

from . import compat
from .backends import resolve_backend
from .families import family_of_layer
from .group import CQILGroup
from .plan import CQILPlan

__all__ = ["convert", "revert", "get_plan", "is_converted", "from_pretrained", "decoder_layers", "CONFIG_KEY"]

#: key under which the plan is stored in ``model.config`` (and so in config.json)
CONFIG_KEY = "cqil"


class _CQILLayer:
    """Mixin placed in front of a decoder layer's own class while it belongs to a group."""

    _cqil_group: CQILGroup
    _cqil_leader: bool

    def forward(self, hidden_states, *args, **kwargs):
        if args:  # transformers passes keywords; bind stray positionals by the original signature
            import inspect

            bound = inspect.signature(self._cqil_base_class.forward).bind(self, hidden_states, *args, **kwargs)
            bound.arguments.pop("self")
            hidden_states = bound.arguments.pop("hidden_states")
            kwargs = {**bound.arguments.pop("kwargs", {}), **bound.arguments}
        if not self._cqil_leader:
            return compat.layer_output(hidden_states)
        return compat.layer_output(self._cqil_group.forward(hidden_states, **kwargs))

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half() re-allocate parameters: drop the stale buffers now (memory), the
        # group restacks from the new parameters on its next forward.
        result = super()._apply(fn, *args, **kwargs)
        stack = self._cqil_group.stack
        if stack is not None:
            stack.invalidate()
        return result


_SUBCLASSES: dict[type, type] = {}


def _cqil_class(base: type) -> type:
    cls = _SUBCLASSES.get(base)
    if cls is None:
        cls = type(f"CQIL{base.__name__}", (_CQILLayer, base), {"_cqil_base_class": base, "__module__": __name__})
        _SUBCLASSES[base] = cls
    return cls


def decoder_layers(model) -> nn.ModuleList:
    """``model.model.layers`` (causal LM) or ``model.layers`` (base model)."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TypeError(
        f"{type(model).__name__} has no decoder layer list (model.model.layers or model.layers): "
        "CQIL converts Llama, Mistral, Qwen2 and Qwen3 models from transformers"
    )


def is_converted(model) -> bool:
    try:
        layers = decoder_layers(model)
    except TypeError:
        return False
    return any(isinstance(layer, _CQILLayer) for layer in layers)


def get_plan(model) -> CQILPlan | None:
    """The plan a converted model runs (None when it is not converted)."""
    if not is_converted(model):
        return None
    return CQILPlan.from_dict(getattr(model.config, CONFIG_KEY))


def _coerce_plan(plan, model) -> CQILPlan:
    if plan is None:
        stored = getattr(getattr(model, "config", None), CONFIG_KEY, None)
        if stored is None:
            raise ValueError(f"no plan given and model.config has no '{CONFIG_KEY}' entry to read one from")
        return CQILPlan.from_dict(stored)
    if isinstance(plan, CQILPlan):
        return plan
    if isinstance(plan, dict):
        return CQILPlan.from_dict(plan)
    raise TypeError(f"plan must be a CQILPlan or a dict {{'groups': ..., 'bypass': ...}}, got {type(plan).__name__}")


def _check_group(model, layers, group) -> None:
    members = [layers[i] for i in group]
    cfg = getattr(model, "config", None)
    types = getattr(cfg, "layer_types", None)
    if types is not None and len({types[i] for i in group}) > 1:
        raise ValueError(
            f"group {list(group)} mixes attention types {[types[i] for i in group]}: the layers of a "
            "group share one attention mask, so they must all be full or all sliding attention"
        )
    devices = {p.device for layer in members for p in layer.parameters()}
    if any(d.type == "meta" for d in devices):
        raise ValueError(f"group {list(group)} has parameters on the meta device (offloaded); load the weights first")
    if len(devices) > 1:
        raise ValueError(f"group {list(group)} spans devices {sorted(map(str, devices))}: a group must live on one device")
    shapes = [[(n, tuple(p.shape)) for n, p in layer.named_parameters()] for layer in members]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ValueError(f"group {list(group)}: layers have different parameter shapes; CQIL groups need identical layers")
    hidden_act = getattr(cfg, "hidden_act", "silu")
    if hidden_act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {hidden_act!r} is not supported: CQIL groups implement SiLU-gated MLPs")


def convert(model, plan: CQILPlan | dict | None = None, backend: str = "auto"):
    """Convert ``model`` in place to run ``plan``'s groups; returns the model.

    Args:
        model: a transformers Llama/Mistral/Qwen2/Qwen3 causal LM (or base model).
        plan: the groups and bypass (one d for all groups or one per group); None reads
            ``model.config.cqil`` (e.g. after from_pretrained).
        backend: "torch" (reference, any device), "triton" (fused kernels) or "auto" (Triton on
            CUDA when available, else torch).

    Raises:
        TypeError: unsupported model or plan type. ValueError: invalid plan for this model.
        Nothing is changed when an error is raised.

    Example:
        >>> plan = CQILPlan.contiguous(start=12, end=30, parallel=2)
        >>> model = convert(model, plan)
        >>> model.generate(**inputs, max_new_tokens=32)
    """
    # ---- check everything first
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module from transformers, got {type(model).__name__}")
    layers = decoder_layers(model)
    if is_converted(model):
        raise ValueError("model is already CQIL-converted; call cqil_kernels.revert(model) before converting again")
    plan = _coerce_plan(plan, model)
    plan.validate_for(len(layers))
    families = {family_of_layer(layer).name for layer in layers}
    if len(families) != 1:
        raise TypeError(f"model mixes decoder layer families {sorted(families)}")
    family = family_of_layer(layers[0])
    for group in plan.groups:
        _check_group(model, layers, group)
    device = next(model.parameters()).device
    backend = resolve_backend(backend, device)

    # ---- then change: build groups (stacking re-points parameters), swap classes
    # (Stacking copies values into new buffers and re-points the same Parameter objects: should
    # it fail half way, the model still computes exactly as before.)
    built = [
        CQILGroup([layers[i] for i in group], group, plan.bypass_of(gi), family, backend)
        for gi, group in enumerate(plan.groups)
        if len(group) > 1  # a one-layer group is that layer, sequential
    ]
    for g in built:
        for pos, layer in enumerate(g.layers):
            layer.__class__ = _cqil_class(type(layer))
            layer._cqil_group = g
            layer._cqil_leader = pos == 0
    setattr(model.config, CONFIG_KEY, plan.to_dict())
    model._cqil_backend = backend
    if backend == "triton" and device.type == "cuda":
        from .ops._common import reserve_tile_counters  # the serial split-K counters, before any capture

        reserve_tile_counters(device)
    return model


def revert(model):
    """Undo ``convert`` in place: every layer runs sequentially again; returns the model.

    Parameters keep their values (they stay views of the group buffers, which is harmless).
    """
    layers = decoder_layers(model)
    for layer in layers:
        if isinstance(layer, _CQILLayer):
            base = layer._cqil_base_class
            del layer._cqil_group
            del layer._cqil_leader
            layer.__class__ = base
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, CONFIG_KEY):
        delattr(cfg, CONFIG_KEY)
    if "_cqil_backend" in model.__dict__:
        del model.__dict__["_cqil_backend"]
    return model


def from_pretrained(path, plan: CQILPlan | dict | None = None, backend: str = "auto", **kwargs):
    """Load a causal LM saved after ``convert`` (its config holds the plan) and convert it again.

    ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (dtype, device_map, gguf_file, ...).
    A plain checkpoint loads too when ``plan`` is given.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return convert(model, plan, backend=backend)
