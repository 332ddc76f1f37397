"""Tiny random Llama-family models for tests: made in the test, no downloads.

``make_tiny(family, ...)`` returns an eval-mode causal LM in fp32 with deterministic weights.
Sizes are deliberately odd (hidden 48, MLP 88) so that block-size assumptions show up.
"""

from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(family: str, num_layers: int = 6, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=88,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        # sliding_window larger than every test sequence: same math, the kwarg still flows.
        return MistralConfig(sliding_window=200, **common)
    if family == "qwen2":
        return Qwen2Config(**common)  # q/k/v biases
    if family == "qwen3":
        return Qwen3Config(**common)  # per-head q_norm / k_norm
    raise ValueError(f"unknown family {family!r}")


def make_tiny(family: str = "llama", num_layers: int = 6, seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A tiny random causal LM of ``family`` with ``num_layers`` layers, eval mode, fp32."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, num_layers=num_layers, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    # HF initialises norms to 1 and biases to 0: randomise them so that a kernel which drops a
    # norm weight or a bias cannot pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                # larger weights than HF's 0.02 so that layers differ visibly from identity
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    model.eval()
    return model


def new_cache(model, kind: str, max_len: int):
    """A fresh transformers cache: "dynamic" or "static" (``max_len`` slots)."""
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    raise ValueError(f"unknown cache kind {kind!r}")


def greedy_decode_logits(model, ids, mask, cache, steps: int):
    """Prefill, then ``steps`` cached decode steps feeding back argmax tokens.

    Returns the last-position logits of every step, [B, steps + 1, V].
    """
    logits = []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)
