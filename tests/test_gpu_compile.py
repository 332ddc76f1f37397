"""Every Triton kernel, with the arguments the ops really pass, compiles for the H100 (sm_90).

No GPU needed (see benchmarks/gpu_compile.py): the launches of representative workloads are recorded
under the interpreter, with the H100's launch decisions (132 SMs, GPU tile sizes) and the GPU's
values of the interpreter-only constexprs, then compiled by Triton in a fresh process. This is
what the interpreter cannot check: that the kernels are valid GPU programs for every
specialisation the ops produce (decode M = 1 makes M a constexpr, split and unsplit paths, serial
split-K atomics, the bf16 tensor-core path).
"""

import os
import sys

import pytest
import torch

import cqil_kernels as ck
from tiny_models import make_tiny

pytestmark = [pytest.mark.interpreter, pytest.mark.slow]

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def _workloads(device):
    """Prefill + decode steps of small bf16 models in both split-K modes: every kernel, split and
    unsplit, decode (M = 1, 2) and prefill (M > 16) tiles, Qwen3 q/k norm, Qwen2 bias, bypass."""
    from cqil_kernels.ops import _common

    for mode in ("serial", "kernel"):
        _common.SPLITK_MODE = mode
        for family, groups, bypass, batch in (("llama", [[1, 2]], 0, 1), ("qwen3", [[0, 1, 2]], 1, 2),
                                              ("qwen2", [[1, 2]], 1, 1)):
            model = make_tiny(family, num_layers=4, hidden_size=256, intermediate_size=300).to(device, torch.bfloat16)
            ck.convert(model, ck.CQILPlan(groups=groups, bypass=bypass), backend="triton")
            # S = 300 slots: the decode attention splits its KV
            engine = ck.DecodeEngine(model, max_batch_size=batch, max_length=300, backend="triton", cuda_graph=False)
            ids = torch.randint(3, 90, (batch, 20), device=device)
            tok = engine.prefill(ids, torch.ones_like(ids)).argmax(-1)
            engine.step(tok)


def test_all_kernels_compile_for_h100(device, monkeypatch, tmp_path):
    pytest.importorskip("triton")
    from cqil_kernels.ops import _common
    from gpu_compile import LaunchRecorder
    from sm90_resources import as_on_gpu, compile_records, record_real_shapes

    if device != "cpu":
        pytest.skip("records through the interpreter (CPU run); on a GPU the kernels compile by running")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_common, "SM_COUNT_OVERRIDE", 132)
    monkeypatch.setattr(_common, "SPLITK_MODE", _common.SPLITK_MODE)
    with LaunchRecorder() as rec:
        _workloads(device)
    # and the exact GPU signatures (bf16 stores, GPU dtype paths) at real shapes, recorded dry
    with as_on_gpu(), LaunchRecorder(dry=True) as real:
        record_real_shapes(real, Ms=(1, 512), Ps=(2,))
    records = rec.unique() + real.unique()
    names = {r["name"] for r in records}
    # every kernel of the package was exercised
    assert names >= {"_qkv_gemm_kernel", "_rope_cache_kernel", "_decode_attn_kernel", "_decode_combine_kernel",
                     "_batched_gemm_kernel", "_gate_up_kernel", "_down_sum_kernel", "_splitk_reduce_kernel"}, names
    results = compile_records(records, arch=90, ptxas_info=False)
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n".join(f"{r['name']}: {r['error']}" for r in failed)
    assert len(results) == len(records)
    # H100: 228 KB of shared memory per SM, at most 227 KB per block
    assert max(r["shared"] for r in results) <= 227 * 1024
