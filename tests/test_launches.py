"""LaunchCounter, and the decode step's launch budget: a group costs the same launches whatever P."""

import pytest
import torch

import cqil_kernels as ck
from cqil_kernels.launches import LaunchCounter
from tiny_models import make_tiny


def test_counts_working_aten_ops_not_views_or_allocations():
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    with LaunchCounter() as c:
        x = a + b                    # 1
        y = x.view(6, 4).t()         # views: 0
        torch.empty(10)              # allocation: 0
        z = y.contiguous()           # copy: 1
        z.mul_(2)                    # 1
    assert c.total == 3, c.by_name
    assert c.by_name["aten::add"] == 1 and c.syncs == 0


def test_counts_host_syncs():
    with LaunchCounter() as c:
        torch.ones(3).sum().item()
    assert c.syncs == 1


@pytest.mark.interpreter
def test_counts_triton_launches_not_the_interpreters_own_ops(device, monkeypatch):
    from cqil_kernels.launch_config import use_launch_config
    from cqil_kernels.ops import _splitk
    from cqil_kernels.ops.qkv_gemm import qkv_gemm_triton

    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, nw = torch.randn(2, 40, device=device), [torch.ones(40, device=device) for _ in range(2)]
    w = [torch.randn(24, 40, device=device) for _ in range(2)]
    with use_launch_config(splitk_mode="kernel"), LaunchCounter() as c:
        qkv_gemm_triton(x, nw, w, None, 1e-6, split_k=2)
    assert dict(c.by_name) == {"triton::_qkv_gemm_kernel": 1, "triton::_splitk_reduce_kernel": 1}
    _splitk.tile_counters(x, 1)  # allocated once per device (one aten::zeros the first time)
    with use_launch_config(splitk_mode="serial"), LaunchCounter() as c:
        qkv_gemm_triton(x, nw, w, None, 1e-6, split_k=2)
    assert dict(c.by_name) == {"triton::_qkv_gemm_kernel": 1}
    with LaunchCounter() as c:
        qkv_gemm_triton(x, nw, w, None, 1e-6, split_k=1)
    assert c.total == 1 and c.triton_launches() == 1


def _step_launches(model, backend, device):
    engine = ck.DecodeEngine(model, max_batch_size=2, max_length=24, backend=backend, cuda_graph=False)
    ids = torch.randint(1, model.config.vocab_size, (2, 6), device=device)
    tok = engine.prefill(ids, torch.ones_like(ids)).argmax(-1)
    engine.step(tok)
    with LaunchCounter() as c:
        engine.step(tok)
    return engine.num_sequential_steps, c


MAIN_KERNELS = ("_qkv_gemm_kernel", "_rope_cache_kernel", "_decode_attn_kernel", "_batched_gemm_kernel",
                "_gate_up_kernel", "_down_sum_kernel")


# Llama through every plan shape; Qwen3 (q/k norm inside the RoPE/cache kernel) through the mixed
# plan only: each interpreted step at GPU tile sizes costs seconds on the CI machine.
LAUNCH_PLANS = {"llama": ([], [[1, 2]], [[0, 1, 2, 3]], [[0, 1], [2, 3, 4]]), "qwen3": ([], [[0, 1], [2, 3, 4]])}


@pytest.mark.interpreter
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_decode_step_launches_per_segment_do_not_grow_with_p(device, monkeypatch, family):
    """With the Triton op set and H100-sized launch heuristics, one segment (a layer, or a group of
    any P) launches each of the six fused kernels once - qkv GEMM, RoPE/cache, attention, o_proj,
    gate_up, down - and nothing else: the split-K GEMMs finish in their own last program. The rest
    of the step is a fixed handful of launches, and it needs no host synchronisation."""
    from cqil_kernels.launch_config import heuristic_config, use_launch_config

    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with use_launch_config(heuristic_config("gpu", sm_count=132)):
        _launches_per_segment(family, device)


def _launches_per_segment(family, device):
    fixed = set()
    for groups in LAUNCH_PLANS[family]:
        # hidden 200, MLP 260: K spans two or more of the GPU's 128-wide tiles, so the GEMMs split
        model = make_tiny(family, num_layers=6, hidden_size=200, intermediate_size=260).to(device)
        if groups:
            ck.convert(model, ck.CQILPlan(groups=groups), backend="triton")
        steps, c = _step_launches(model, "triton", device)
        assert c.syncs == 0, c.by_name
        lm_head = 1  # final norm + lm_head run as one qkv_gemm
        for name in MAIN_KERNELS:
            assert c.by_name[f"triton::{name}"] == steps + (lm_head if name == "_qkv_gemm_kernel" else 0), (name, c.by_name)
        assert c.triton_launches() == 6 * steps + lm_head, c.by_name
        fixed.add(c.total - c.triton_launches())
    assert len(fixed) == 1 and fixed.pop() <= 8, fixed


@pytest.mark.interpreter
def test_decode_step_splits_its_gemms(device, monkeypatch):
    """The shapes above do split (so the previous test covers the serial split-K path): in
    "kernel" mode the same step launches reductions."""
    from cqil_kernels.launch_config import heuristic_config, use_launch_config

    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = make_tiny("llama", num_layers=2, hidden_size=200, intermediate_size=260).to(device)
    with use_launch_config(heuristic_config("gpu", sm_count=132).replace(splitk_mode="kernel")):
        steps, c = _step_launches(model, "triton", device)
    assert c.by_name["triton::_splitk_reduce_kernel"] >= 2 * steps
