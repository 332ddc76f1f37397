"""The model families CQIL conversion supports, as data.

One table row per family instead of one patch function per model: the group code reads the
decoder layer through these names. Families are recognised by their decoder-layer class, so a
base model (``LlamaModel``) converts as well as a causal LM (``LlamaForCausalLM``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Family", "FAMILIES", "family_of_layer"]


@dataclass(frozen=True)
class Family:
    name: str
    layer_class: str
    #: per-head RMSNorm on q and k before RoPE (Qwen3)
    qk_norm: bool
    #: how the attention module passes ``sliding_window`` to the attention function:
    #: None (Llama: not at all), "config" (Mistral: config.sliding_window), "module" (Qwen2/3:
    #: the attention module's own attribute, set per layer type)
    sliding_window_from: str | None


FAMILIES: dict[str, Family] = {
    f.layer_class: f
    for f in (
        Family("llama", "LlamaDecoderLayer", qk_norm=False, sliding_window_from=None),
        Family("mistral", "MistralDecoderLayer", qk_norm=False, sliding_window_from="config"),
        Family("qwen2", "Qwen2DecoderLayer", qk_norm=False, sliding_window_from="module"),
        Family("qwen3", "Qwen3DecoderLayer", qk_norm=True, sliding_window_from="module"),
    )
}


def family_of_layer(layer) -> Family:
    """The Family of a decoder layer, by its (original) class; TypeError when unsupported."""
    cls = getattr(layer, "_cqil_base_class", type(layer))
    family = FAMILIES.get(cls.__name__)
    if family is None:
        supported = ", ".join(f"{f.name} ({f.layer_class})" for f in FAMILIES.values())
        raise TypeError(f"unsupported decoder layer class {cls.__name__}; CQIL supports {supported}")
    return family


def sliding_window_of(family: Family, attn) -> int | None:
    if family.sliding_window_from == "config":
        return getattr(attn.config, "sliding_window", None)
    if family.sliding_window_from == "module":
        return getattr(attn, "sliding_window", None)
    return None
