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
from .backends import get_ops, resolve_backend
from .families import FAMILIES, family_of_layer
from .group import CQILGroup
from .plan import CQILPlan

__all__ = ["convert", "revert", "get_plan", "is_converted", "from_pretrained", "decoder_layers", "check_model", "placement_of", "CONFIG_KEY"]

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


_SUBCLASSES: dict[type, type] = {}


def _cqil_class(base: type) -> type:
    cls = _SUBCLASSES.get(base)
    if cls is None:
        cls = type(f"CQIL{base.__name__}", (_CQILLayer, base), {"_cqil_base_class": base, "__module__": __name__})
        _SUBCLASSES[base] = cls
    return cls


def __getattr__(name: str):
    """``cqil_kernels.conversion.CQILLlamaDecoderLayer`` etc.: the generated layer classes by name,
    so ``pickle`` / ``torch.save(model)`` of a converted model can find them again (also in a new
    process, where no conversion has created them yet)."""
    if name.startswith("CQIL"):
        import importlib

        for family in FAMILIES.values():
            if name == "CQIL" + family.layer_class:
                module = importlib.import_module(f"transformers.models.{family.name}.modeling_{family.name}")
                return _cqil_class(getattr(module, family.layer_class))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    """The plan a converted model runs (None when it is not converted).

    The groups themselves are the truth; the copy in ``model.config`` (which may also list
    one-layer groups) is returned when it agrees with them.
    """
    if not is_converted(model):
        return None
    groups, bypass = [], []
    for layer in decoder_layers(model):
        if isinstance(layer, _CQILLayer) and layer._cqil_leader:
            groups.append(tuple(layer._cqil_group.group_indices))
            bypass.append(layer._cqil_group.bypass)
    stored = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if isinstance(stored, dict):
        try:
            plan = CQILPlan.from_dict(stored)
        except (TypeError, ValueError):
            plan = None
        if plan is not None and plan.parallel_groups == tuple(groups):
            return plan
    return CQILPlan(groups=groups, bypass=bypass[0] if len(set(bypass)) == 1 else bypass)


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


def check_model(model, require_loaded: bool = False):
    """What CQIL computes for a model, checked: returns (decoder layers, family).

    Raises TypeError for an unsupported model or layer family, ValueError for a configuration the
    group kernels do not implement (a non-SiLU MLP) or, with ``require_loaded``, weights that are
    not loaded (meta device; ``convert`` checks that per group, since transformers can run
    offloaded layers outside groups). Shared by ``convert`` and the decode engine, so neither
    accepts what the other refuses.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module from transformers, got {type(model).__name__}")
    layers = decoder_layers(model)
    if len(layers) == 0:
        raise TypeError(f"{type(model).__name__} has no decoder layers")
    families = {family_of_layer(layer).name for layer in layers}
    if len(families) != 1:
        raise TypeError(f"model mixes decoder layer families {sorted(families)}")
    hidden_act = getattr(getattr(model, "config", None), "hidden_act", "silu")
    if hidden_act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {hidden_act!r} is not supported: CQIL implements SiLU-gated MLPs")
    if require_loaded:
        placed = model.__dict__.get("_cqil_placement")
        released = set(placed[2]) if placed is not None else set()  # held by other ranks: meta on purpose
        skip = {id(p) for i in released for p in layers[i].parameters()}
        if any(p.device.type == "meta" and id(p) not in skip for p in model.parameters()):
            raise ValueError("the model has parameters on the meta device (not loaded or offloaded); load the weights first")
    return layers, family_of_layer(layers[0])


def _communicator(process_group, device):
    """A Communicator from a torch process group, a ``distributed.DistContext`` or a Communicator."""
    from .distributed import Communicator, DistContext

    if isinstance(process_group, Communicator):
        if process_group.device != device and not (device.type == process_group.device.type == "cuda"):
            raise ValueError(f"the communicator serves {process_group.device}, the model is on {device}")
        return process_group
    if isinstance(process_group, DistContext):
        return Communicator.from_context(process_group)
    import torch.distributed as dist

    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError("process_group must be a torch.distributed ProcessGroup, a cqil_kernels.distributed."
                        f"DistContext or a Communicator, got {type(process_group).__name__}")
    return Communicator(process_group, device)


def convert(model, plan: CQILPlan | dict | None = None, backend: str = "auto", process_group=None,
            free_unheld: bool = True):
    """Convert ``model`` in place to run ``plan``'s groups; returns the model.

    Args:
        model: a transformers Llama/Mistral/Qwen2/Qwen3 causal LM (or base model).
        plan: the groups and bypass (one d for all groups or one per group); None reads
            ``model.config.cqil`` (e.g. after from_pretrained).
        backend: "torch" (reference, any device), "triton" (fused kernels) or "auto" (Triton on
            CUDA when available, else torch).
        process_group: split every group over the ranks of this ``torch.distributed`` process
            group (or ``cqil_kernels.distributed.DistContext`` / ``Communicator``): on W ranks
            (W must divide every group's size) rank r computes the contiguous block of P/W layers
            ``[r*P/W, (r+1)*P/W)`` of each group and one all-reduce per group gives every rank the
            same output; layers outside groups, embeddings, final norm and head are replicated.
            A collective: every rank calls ``convert`` with the same model and plan (checked: a
            mismatch raises on every rank). None: one process, every layer here.
        free_unheld: with ``process_group``, release the weights of the layers other ranks hold
            (they become meta tensors; ``revert`` is then refused: reload the model).

    Raises:
        TypeError: unsupported model or plan type. ValueError: invalid plan for this model (or
        one the ranks cannot split). ``distributed.RankMismatchError``: ranks started with
        different models or plans. Nothing is changed when an error is raised.

    Example:
        >>> plan = CQILPlan.contiguous(start=12, end=30, parallel=2)
        >>> model = convert(model, plan)
        >>> model.generate(**inputs, max_new_tokens=32)
    """
    # ---- check everything first
    layers, family = check_model(model)
    if is_converted(model):
        raise ValueError("model is already CQIL-converted; call cqil_kernels.revert(model) before converting again")
    plan = _coerce_plan(plan, model)
    plan.validate_for(len(layers))
    for group in plan.groups:
        _check_group(model, layers, group)
    device = next(model.parameters()).device
    backend = resolve_backend(backend, device)
    comm = placement = None
    if process_group is not None:
        from .distributed import check_consistent, fingerprint, place

        comm = _communicator(process_group, device)
        placement = place(plan, comm.world_size, len(layers))
        # the ranks must run the same model and plan; a collective, before anything changes
        fp = fingerprint(plan, getattr(model, "config", None), model.named_parameters(), comm.world_size,
                         extra={"backend": backend})
        check_consistent(fp, comm.group, comm.rank, comm.timeout_s)

    # ---- then change: build groups (they only reference the layers), swap classes
    built = []
    for gi, group in enumerate(plan.groups):
        if len(group) < 2:
            continue  # a one-layer group is that layer, sequential
        held = group if placement is None else placement.shard(gi, comm.rank)
        built.append((group, CQILGroup([layers[i] for i in held], held, plan.bypass_of(gi), family, backend,
                                       group_indices=group, comm=comm)))
    freed = []
    for group, g in built:
        for pos, i in enumerate(group):
            layer = layers[i]
            layer.__class__ = _cqil_class(type(layer))
            # plain attributes, not submodules: the group must not add state-dict entries
            layer.__dict__["_cqil_group"] = g
            layer.__dict__["_cqil_leader"] = pos == 0
            if free_unheld and i not in g.indices:
                freed.append(i)
    for i in freed:
        layers[i].to_empty(device="meta")  # its weights live on another rank
    setattr(model.config, CONFIG_KEY, plan.to_dict())
    model._cqil_backend = backend
    if placement is not None:
        model.__dict__["_cqil_placement"] = (placement, comm.rank, tuple(freed))
    get_ops(backend).prepare(device)  # e.g. the serial split-K counters, before any capture
    return model


def placement_of(model):
    """``(Placement, rank, freed layer indices)`` of a model converted with a process group, or None."""
    return model.__dict__.get("_cqil_placement")


def revert(model):
    """Undo ``convert`` in place: every layer runs sequentially again; returns the model.

    Parameters are untouched (conversion never copied or re-pointed them).
    """
    layers = decoder_layers(model)
    placed = placement_of(model)
    if placed is not None and placed[2]:
        raise ValueError(
            f"this rank released the weights of layers {list(placed[2])} (held by other ranks): it cannot run "
            "them sequentially; reload the model to get the sequential model back"
        )
    for layer in layers:
        if isinstance(layer, _CQILLayer):
            base = layer._cqil_base_class
            layer.__dict__.pop("_cqil_group", None)
            layer.__dict__.pop("_cqil_leader", None)
            layer.__class__ = base
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, CONFIG_KEY):
        delattr(cfg, CONFIG_KEY)
    if "_cqil_backend" in model.__dict__:
        del model.__dict__["_cqil_backend"]
    model.__dict__.pop("_cqil_placement", None)
    return model


def from_pretrained(path, plan: CQILPlan | dict | None = None, backend: str = "auto", **kwargs):
    """Load a causal LM saved after ``convert`` (its config holds the plan) and convert it again.

    ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (dtype, device_map, gguf_file, ...).
    A plain checkpoint loads too when ``plan`` is given.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return convert(model, plan, backend=backend)
