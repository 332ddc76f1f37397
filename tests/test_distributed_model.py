"""CQIL groups split over ranks (gloo on the CPU) against the one-process converted model.

Every rank builds the same tiny model (same seed), converts it with the process group, and
returns plain data: prefill logits, generated tokens, its placement. The parent compares with the
one-process run of the same plan: logits to fp32 rounding (the sum over layers is grouped
differently), tokens exactly, and the ranks with each other bitwise (one all-reduce gives every
rank the same sums).
"""

from __future__ import annotations

import pytest
import torch

import cqil_kernels as ck
from distributed_harness import run_ranks
from tiny_models import make_tiny, new_cache

NUM_LAYERS = 6
ATOL = 2e-5


def _prompt(batch=2, pads=(0, 3), T=7, seed=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (batch, T), generator=g)
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads[:batch]):
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask


def _model(family, groups, bypass, process_group=None):
    model = make_tiny(family, num_layers=NUM_LAYERS)
    ck.convert(model, ck.CQILPlan(groups, bypass=bypass), backend="torch", process_group=process_group)
    return model


def _one_process(family, groups, bypass, steps=6, cache="dynamic"):
    model = _model(family, groups, bypass)
    ids, mask = _prompt()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        kw = {} if cache == "dynamic" else {"past_key_values": new_cache(model, "static", ids.shape[1] + steps)}
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, **kw)
    engine = ck.DecodeEngine(model, max_batch_size=2, max_length=ids.shape[1] + steps, backend="torch")
    return logits, tokens, engine.generate(ids, mask, max_new_tokens=steps, eos_token_id=[])


def _rank_forward(ctx, family, groups, bypass, steps, cache, overlap):
    """One rank: prefill logits, HF greedy tokens, engine tokens (plain and, if asked, overlapped)."""
    model = _model(family, groups, bypass, process_group=ctx.group)
    ids, mask = _prompt()
    out = {"rank": ctx.rank, "placement": ck.conversion.placement_of(model)[0].to_dict()}
    with torch.no_grad():
        out["logits"] = model(input_ids=ids, attention_mask=mask).logits.tolist()
        kw = {} if cache == "dynamic" else {"past_key_values": new_cache(model, "static", ids.shape[1] + steps)}
        out["tokens"] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                       synced_gpus=True, **kw).tolist()
    engine = ck.DecodeEngine(model, max_batch_size=2, max_length=ids.shape[1] + steps, backend="torch",
                             process_group=ctx.group)
    out["engine"] = engine.generate(ids, mask, max_new_tokens=steps, eos_token_id=[]).tolist()
    if overlap:
        over = ck.DecodeEngine(model, max_batch_size=2, max_length=ids.shape[1] + steps, backend="torch",
                               overlap=True)
        out["overlap"] = over.generate(ids, mask, max_new_tokens=steps, eos_token_id=[]).tolist()
        out["overlap_logits"] = over.prefill(ids, mask).tolist()
        out["plain_logits"] = engine.prefill(ids, mask).tolist()
    return out


CASES = [  # family, world size, groups, bypass, cache, overlap
    ("llama", 2, [[1, 2], [3, 4]], [1, 0], "dynamic", True),  # a bypass per group
    ("qwen2", 2, [[1, 2, 3, 4]], 1, "static", False),
    ("qwen3", 2, [[2, 3]], 1, "dynamic", True),
    ("mistral", 2, [[0, 1, 2, 3]], 2, "dynamic", False),
    ("llama", 4, [[1, 2, 3, 4]], 0, "static", True),
    ("qwen3", 4, [[1, 2, 3, 4]], 3, "dynamic", False),
]


@pytest.mark.parametrize("family,world,groups,bypass,cache,overlap", CASES)
def test_split_groups_match_the_one_process_model(family, world, groups, bypass, cache, overlap):
    steps = 5
    ref_logits, ref_tokens, ref_engine = _one_process(family, groups, bypass, steps, cache)
    outs = run_ranks(_rank_forward, world, family, groups, bypass, steps, cache, overlap,
                     pg_timeout=60.0, join_timeout=240.0)
    for r, out in enumerate(outs):
        placement = out["placement"]
        assert placement["world_size"] == world
        got = torch.tensor(out["logits"])
        torch.testing.assert_close(got, ref_logits, atol=ATOL, rtol=0)
        # one all-reduce: every rank holds the same sums, bit for bit
        assert torch.equal(got, torch.tensor(outs[0]["logits"])), f"rank {r} differs from rank 0"
        assert out["tokens"] == ref_tokens.tolist(), f"rank {r}: HF generate tokens differ"
        assert out["engine"] == ref_engine.tolist(), f"rank {r}: engine tokens differ"
        if overlap:
            assert out["overlap"] == out["engine"], "the overlapped schedule changed the tokens"
            torch.testing.assert_close(torch.tensor(out["overlap_logits"]), torch.tensor(out["plain_logits"]),
                                       atol=ATOL, rtol=0)


def _rank_held_layers(ctx):
    model = _model("llama", [[1, 2, 3, 4]], 0, process_group=ctx.group)
    layers = model.model.layers
    meta = [i for i, layer in enumerate(layers) if any(p.is_meta for p in layer.parameters())]
    try:
        ck.revert(model)
        reverted = True
    except ValueError as e:
        reverted = str(e)
    return {"meta": meta, "held": list(layers[1]._cqil_group.indices), "reverted": reverted}


def test_each_rank_holds_its_block_and_frees_the_rest():
    outs = run_ranks(_rank_held_layers, 2, pg_timeout=30.0, join_timeout=120.0)
    assert outs[0]["held"] == [1, 2] and outs[1]["held"] == [3, 4]
    assert outs[0]["meta"] == [3, 4] and outs[1]["meta"] == [1, 2]
    assert all("reload the model" in o["reverted"] for o in outs)


def _rank_mismatched_plan(ctx):
    groups = [[1, 2]] if ctx.rank == 0 else [[3, 4]]
    model = make_tiny("llama", num_layers=NUM_LAYERS)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    try:
        ck.convert(model, ck.CQILPlan(groups), backend="torch", process_group=ctx.group)
    except Exception as e:  # noqa: BLE001 - returned to the parent
        unchanged = not ck.is_converted(model) and all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
        return {"error": type(e).__name__, "message": str(e), "unchanged": unchanged}
    return {"error": None}


def test_ranks_with_different_plans_are_refused_before_any_change():
    outs = run_ranks(_rank_mismatched_plan, 2, pg_timeout=30.0, join_timeout=120.0)
    for o in outs:
        assert o["error"] == "RankMismatchError" and "plan differs" in o["message"], o
        assert o["unchanged"]


def _rank_unplaceable(ctx):
    model = make_tiny("llama", num_layers=NUM_LAYERS)
    try:
        ck.convert(model, ck.CQILPlan([[1, 2, 3]]), backend="torch", process_group=ctx.group)
    except ValueError as e:
        return {"message": str(e), "converted": ck.is_converted(model)}
    return {"message": None}


def test_a_group_the_ranks_cannot_split_is_refused():
    outs = run_ranks(_rank_unplaceable, 2, pg_timeout=30.0, join_timeout=120.0)
    for o in outs:
        assert o["message"] and "[1, 2, 3]" in o["message"] and not o["converted"], o


def _rank_sampled(ctx):
    model = _model("llama", [[1, 2], [3, 4]], 0, process_group=ctx.group)
    ids, mask = _prompt()
    engine = ck.DecodeEngine(model, max_batch_size=2, max_length=20, backend="torch")
    gen = torch.Generator().manual_seed(100 + ctx.rank)  # different seeds: rank 0's samples must win
    return engine.generate(ids, mask, max_new_tokens=6, do_sample=True, generator=gen, eos_token_id=[]).tolist()


def test_sampled_tokens_are_rank_zeros_on_every_rank():
    outs = run_ranks(_rank_sampled, 2, pg_timeout=30.0, join_timeout=120.0)
    assert outs[0] == outs[1]


def _rank_dies_mid_forward(ctx):
    import os

    model = _model("llama", [[1, 2]], 0, process_group=ctx.group)
    ids, mask = _prompt()
    if ctx.rank == 1:
        os._exit(3)  # dies before the group's all-reduce
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    return "finished"


def test_a_dead_rank_ends_the_forward_with_an_error():
    outs = run_ranks(_rank_dies_mid_forward, 2, pg_timeout=8.0, join_timeout=60.0, expect_failure=True)
    assert outs[1].status == "exited"
    assert outs[0].status == "error", outs[0]
    assert outs[0].elapsed_s < 40



def _rank_hf_sampled(ctx):
    from cqil_kernels.distributed import check_same, shared_seed

    model = _model("qwen2", [[1, 2], [3, 4]], 1, process_group=ctx.group)
    ids, mask = _prompt()
    torch.manual_seed(1000 + ctx.rank)  # different local generators: the shared seed must win
    seed = shared_seed(ctx.group, None, ctx.rank)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20,
                             synced_gpus=True)
    check_same(out, ctx.group, "generated tokens", ctx.rank)
    try:
        check_same(torch.tensor([ctx.rank]), ctx.group, "rank ids", ctx.rank)
        mismatch = None
    except Exception as e:  # noqa: BLE001 - returned to the parent
        mismatch = type(e).__name__
    return {"seed": seed, "tokens": out.tolist(), "mismatch": mismatch}


def test_hf_sampling_with_a_shared_seed_gives_every_rank_the_same_tokens():
    outs = run_ranks(_rank_hf_sampled, 2, pg_timeout=30.0, join_timeout=120.0)
    assert outs[0]["seed"] == outs[1]["seed"]
    assert outs[0]["tokens"] == outs[1]["tokens"]
    assert outs[0]["mismatch"] == outs[1]["mismatch"] == "RankMismatchError"


def _rank_forward_on(ctx, device, family, groups, bypass):
    """One rank on ``device`` (gloo carries CUDA tensors too: NCCL refuses two ranks on one GPU)."""
    model = make_tiny(family, num_layers=NUM_LAYERS).to(device)
    backend = "triton" if device != "cpu" else "torch"
    ck.convert(model, ck.CQILPlan(groups, bypass=bypass), backend=backend, process_group=ctx.group)
    ids, mask = (t.to(device) for t in _prompt())
    engine = ck.DecodeEngine(model, max_batch_size=2, max_length=16, backend=backend, cuda_graph=False)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return {"logits": logits.float().cpu().tolist(),
            "engine": engine.generate(ids, mask, max_new_tokens=5, eos_token_id=[]).cpu().tolist()}


def test_split_groups_on_one_gpu_through_gloo(cuda_device):
    """Issue 9 item 11: the distributed path with the ranks' tensors on the GPU and the Triton
    kernels (one GPU: gloo; NCCL needs a GPU per rank)."""
    family, groups, bypass = "llama", [[1, 2], [3, 4]], 1
    model = make_tiny(family, num_layers=NUM_LAYERS).to(cuda_device)
    ck.convert(model, ck.CQILPlan(groups, bypass=bypass), backend="triton")
    ids, mask = (t.to(cuda_device) for t in _prompt())
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits.float().cpu()
    ref_engine = ck.DecodeEngine(model, max_batch_size=2, max_length=16, backend="triton", cuda_graph=False)
    ref_tokens = ref_engine.generate(ids, mask, max_new_tokens=5, eos_token_id=[]).cpu().tolist()
    outs = run_ranks(_rank_forward_on, 2, cuda_device, family, groups, bypass, device=cuda_device,
                     pg_timeout=120.0, join_timeout=300.0)
    for out in outs:
        torch.testing.assert_close(torch.tensor(out["logits"]), ref, atol=1e-4, rtol=0)
        assert out["engine"] == ref_tokens
