"""Model shapes, CQIL plans and byte accounting of the decode benchmarks (e2e_decode.py, launch_count.py).

Random-weight Llama models of real shapes (SmolLM2-135M, Llama-7B) and tiny CPU ones, the paper's
S/E/P plans for them, and the bytes a decode step must read (the floor's numerator).
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------- shapes

SHAPES = {
    # SmolLM2-135M: 30 layers, GQA 9/3, tied embeddings
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    # LLaMA-7B: 32 layers, MHA
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, head_dim=128, tie_word_embeddings=False),
}
TINY_SHAPES = {
    "tiny-smollm2": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "tiny-llama": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=False),
}

# The paper's S/E/P plans (reference implementation: LLaMA-1-7B S12-E30 P2, S14-E30 P4) and the
# SmolLM2 plans of design.md section 3's anchors (S14-E30 for both P).
PAPER_PLANS = {32: {2: (12, 30), 4: (14, 30)}, 30: {2: (14, 30), 4: (14, 30)}}


def paper_plan_range(num_layers: int, parallel: int) -> tuple[int, int]:
    """(S, E) of the paper-style plan for a model of ``num_layers`` layers and group size P.

    32 layers (LLaMA-7B): S12-E30 for P2, S14-E30 for P4. 30 layers (SmolLM2-135M): S14-E30 for
    P2 and P4. Any other depth scales the 32-layer S and E by ``num_layers / 32`` (rounded, E at
    most ``num_layers``), e.g. 8 layers: S3-E8 for P2, S4-E8 for P4.
    """
    if num_layers in PAPER_PLANS and parallel in PAPER_PLANS[num_layers]:
        return PAPER_PLANS[num_layers][parallel]
    s32, e32 = PAPER_PLANS[32].get(parallel, (14, 30))
    return round(num_layers * s32 / 32), min(num_layers, round(num_layers * e32 / 32))


def paper_plan(num_layers: int, parallel: int):
    """The CQIL plan this benchmark runs: runs of P layers over ``paper_plan_range`` (a short tail
    before E stays sequential, as ``CQILPlan.contiguous``); P = 1 is the empty plan.

    Example:
        >>> paper_plan(32, 2).num_sequential_steps(32)
        23
    """
    from cqil_kernels import CQILPlan

    if parallel == 1:
        return CQILPlan.sequential()
    start, end = paper_plan_range(num_layers, parallel)
    plan = CQILPlan.contiguous(start, end, parallel)
    if not plan.parallel_groups:
        raise ValueError(f"no group of {parallel} layers fits a {num_layers}-layer model (S{start}-E{end})")
    return plan


def plan_name(num_layers: int, parallel: int) -> str:
    if parallel == 1:
        return "sequential"
    start, end = paper_plan_range(num_layers, parallel)
    return f"S{start}-E{end} P{parallel}"


def build_model(shape_kwargs: dict, device, dtype, seed: int = 0):
    """Random-weight LlamaForCausalLM of the given shape, built directly on ``device`` in ``dtype``.

    No EOS (generation never stops early), pad id 0, SDPA attention, HF's own initialisation.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=0,
                      **shape_kwargs)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def weight_bytes(model) -> int:
    """Bytes a decode step must read: every parameter except the embedding table, plus lm_head
    (counted when tied too: the lm_head GEMM reads the whole [V, H] matrix)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)
    if head is embed:
        total += head.numel() * head.element_size()
    return total


def kv_bytes(cfg, batch: int, live_len: float, elem: int) -> int:
    """K and V bytes attended per decode step at ``live_len`` cached tokens (all layers)."""
    return int(2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * live_len * cfg.head_dim * elem)
