"""transformers version differences the group code must absorb (design.md section 5).

Checked against release wheels: decoder layers return a tuple up to 4.53 and a tensor from 4.54;
the cache kwarg is ``past_key_value`` (<= 4.55), ``past_key_values`` (4.56 .. 5.23) or ``cache``
(5.24+); before 5.4 a StaticLayer needs ``cache_position`` in cache_kwargs or it writes at slot 0.
Versions are compared with packaging.version, never as strings.
"""

from __future__ import annotations

from importlib.metadata import version as _installed_version

from packaging.version import Version

__all__ = [
    "transformers_version",
    "layer_returns_tuple",
    "pop_cache",
    "cache_update",
    "layer_output",
]

CACHE_KWARG_NAMES = ("past_key_values", "past_key_value", "cache")


# Read from the installed metadata (no import of transformers) once: plain module constants are
# also what torch.compile traces best (no lru_cache wrapper to see through).
_TRANSFORMERS = Version(_installed_version("transformers"))
_LAYER_RETURNS_TUPLE = _TRANSFORMERS < Version("4.54")
# From 5.4 the cache layers count positions themselves and cache_position is gone.
_NEEDS_CACHE_KWARGS = _TRANSFORMERS < Version("5.4")


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


def layer_output(hidden_states):
    """Wrap a decoder layer's output the way this transformers' model loop unpacks it."""
    if layer_returns_tuple():
        return (hidden_states,)
    return hidden_states
