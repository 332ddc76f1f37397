"""transformers version differences the group code must absorb (design.md section 5).

Checked against release wheels: decoder layers return a tuple up to 4.53 and a tensor from 4.54;
the cache kwarg is ``past_key_value`` (<= 4.55), ``past_key_values`` (4.56 .. 5.23) or ``cache``
(5.24+); before 5.4 a StaticLayer needs ``cache_position`` in cache_kwargs or it writes at slot 0.
Versions are compared with packaging.version, never as strings.
"""

from __future__ import annotations

import functools
from importlib.metadata import version as _installed_version

from packaging.version import Version

__all__ = [
    "transformers_version",
    "layer_returns_tuple",
    "pop_cache",
    "cache_update",
    "layer_output",
    "cache_kwarg_name",
    "cache_touch",
    "attentions_requested",
]

CACHE_KWARG_NAMES = ("past_key_values", "past_key_value", "cache")


# Read from the installed metadata (no import of transformers) once: plain module constants are
# also what torch.compile traces best (no lru_cache wrapper to see through).
_TRANSFORMERS = Version(_installed_version("transformers"))
_LAYER_RETURNS_TUPLE = _TRANSFORMERS < Version("4.54")
# From 5.4 the cache layers count positions themselves and cache_position is gone.
_NEEDS_CACHE_KWARGS = _TRANSFORMERS < Version("5.4")
# The name modules take the cache under (the old one is still accepted for a while after a rename).
if _TRANSFORMERS < Version("4.56"):
    _CACHE_KWARG = "past_key_value"
elif _TRANSFORMERS < Version("5.24"):
    _CACHE_KWARG = "past_key_values"
else:
    _CACHE_KWARG = "cache"


def transformers_version() -> Version:
    return _TRANSFORMERS


def layer_returns_tuple() -> bool:
    return _LAYER_RETURNS_TUPLE


def needs_cache_kwargs() -> bool:
    return _NEEDS_CACHE_KWARGS


def pop_cache(kwargs: dict):
    """Remove and return the cache object under whichever name this transformers uses."""
    cache = None
    for name in CACHE_KWARG_NAMES:
        value = kwargs.pop(name, None)
        if value is not None:
            cache = value
    return cache


def cache_update(cache, key_states, value_states, layer_idx: int, cos, sin, cache_position):
    """``cache.update`` for one original layer, with the kwargs this transformers expects.

    key_states / value_states: [B, nkv, T, D]. Returns that layer's full keys and values
    [B, nkv, S, D] (S = cached length, or the static cache's maximum length).
    """
    if needs_cache_kwargs():
        cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
        return cache.update(key_states, value_states, layer_idx, cache_kwargs)
    return cache.update(key_states, value_states, layer_idx)


def cache_touch(cache, like, layer_idx: int, cos, sin, cache_position):
    """Advance ``layer_idx``'s cache entry by ``like``'s T positions without storing its keys and
    values (the layer is computed by another process). The entry gets a head dimension of one, so
    its length - which transformers reads for positions and mask sizes - stays right at 1/D of a
    real entry's memory (a zero-width entry would count as empty).

    like: [B, nkv, T, D] (only its shape, dtype and device are used).
    """
    stub = like.new_zeros(*like.shape[:-1], 1)
    cache_update(cache, stub, stub, layer_idx, cos, sin, cache_position)


def layer_output(hidden_states):
    """Wrap a decoder layer's output the way this transformers' model loop unpacks it."""
    if layer_returns_tuple():
        return (hidden_states,)
    return hidden_states


def cache_kwarg_name() -> str:
    """The keyword under which this transformers' attention modules take the cache object."""
    return _CACHE_KWARG


def attentions_requested(output_attentions=None) -> bool:
    """Whether the running forward records attention weights.

    transformers < 5 passes ``output_attentions`` down to the layers; 5.x records them with hooks on
    the attention modules, switched on through a context variable of ``capture_outputs`` (so a
    layer that computes its attention without calling those modules would record nothing).
    torch.compile cannot trace context variables; compiled forwards never record attentions.
    """
    if output_attentions:
        return True
    if output_attentions is False:
        return False
    import torch

    if torch.compiler.is_compiling():
        return False
    var = _output_collector()
    try:
        collected = var.get() if var is not None else None
    except LookupError:  # a plain ContextVar without a default, never set
        collected = None
    return isinstance(collected, dict) and "attentions" in collected


@functools.lru_cache(maxsize=None)
def _output_collector():
    """transformers 5.x's ContextVar holding the outputs being recorded (None if it has none)."""
    import importlib

    for module in ("transformers.utils.output_capturing", "transformers.utils.generic"):
        try:
            var = getattr(importlib.import_module(module), "_active_collector", None)
        except ImportError:
            continue
        if var is not None:
            return var
    return None
