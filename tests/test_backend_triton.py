"""Model level: backend="triton" (fused kernels; interpreter on CPU) vs backend="torch"."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES, greedy_decode_logits, make_tiny, new_cache

import cqil_kernels as ck

pytestmark = pytest.mark.interpreter

PLAN = ck.CQILPlan([[1, 2, 3], [4, 5]], bypass=1)


def _pair(family, device, **kw):
    model = make_tiny(family, num_layers=6, **kw).to(device)
    torch_model = copy.deepcopy(model)
    ck.convert(torch_model, PLAN, backend="torch")
    ck.convert(model, PLAN, backend="triton")
    return model, torch_model


# every family with the dynamic cache; the static cache (the same kernels, another cache object) on
# two of them: each case interprets a whole prefill + decode
@pytest.mark.parametrize("family,cache_kind", [(f, "dynamic") for f in FAMILIES] + [("llama", "static"),
                                                                                   ("qwen2", "static")])
def test_triton_backend_matches_torch_backend(family, cache_kind, device):
    model, torch_model = _pair(family, device)
    ids = torch.tensor([[0, 0, 5, 17, 9, 33], [4, 8, 15, 16, 23, 42]], device=device)
    mask = (ids != 0).long()
    steps = 3

    max_len = ids.shape[1] + steps + 2
    got = greedy_decode_logits(model, ids, mask, new_cache(model, cache_kind, max_len), steps)
    want = greedy_decode_logits(torch_model, ids, mask, new_cache(torch_model, cache_kind, max_len), steps)
    assert torch.isfinite(got).all()
    err = (got - want).abs().max().item()
    assert err <= 1e-3, f"{family} {cache_kind}: max abs error {err:.3g}"


def test_triton_backend_decode_uses_the_fused_attention(monkeypatch, device):
    """The decode step really goes through the split-KV kernel (no silent fallback)."""
    from cqil_kernels.backends import triton_ops

    calls = []
    original = triton_ops._decode_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_ops, "_decode_attention", spy)
    model, _ = _pair("llama", device)
    ids = torch.tensor([[3, 5, 7, 9]], device=device)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
    # one call per group in the decode step, over P*nh heads
    assert sorted(c[1] for c in calls) == [2 * 4, 3 * 4]


def test_triton_backend_generate_tokens_match(device):
    model, torch_model = _pair("qwen2", device)
    ids = torch.tensor([[0, 7, 8, 9], [1, 2, 3, 4]], device=device)
    kw = dict(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**kw), torch_model.generate(**kw))


def test_prefill_sized_gemms_go_to_cublas_only_on_a_gpu():
    """Routing policy of the ops (read from the launch config when they launch): more than
    prefill_m rows on CUDA -> the torch reference (cuBLAS)."""
    from cqil_kernels.launch_config import heuristic_config

    cfg = heuristic_config("gpu")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert cfg.gemm_to_torch(cuda, cfg.prefill_m + 1)
    assert not cfg.gemm_to_torch(cuda, 16)
    assert not cfg.gemm_to_torch(cpu, 4096)  # CPU: the kernels (interpreter) at every size
    assert not cfg.replace(prefill_m=None).gemm_to_torch(cuda, 4096)
    assert cfg.replace(prefill_m=128).gemm_to_torch(cuda, 200)
