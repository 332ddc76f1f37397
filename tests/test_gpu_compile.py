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
    from cqil_kernels.launch_config import use_launch_config

    for mode in ("serial", "kernel"):
        with use_launch_config(splitk_mode=mode):
            _workloads_in_mode(device)


def _workloads_in_mode(device):
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
    from cqil_kernels.launch_config import heuristic_config, use_launch_config
    from gpu_compile import LaunchRecorder
    from sm90_resources import as_on_gpu, compile_records, record_real_shapes

    if device != "cpu":
        pytest.skip("records through the interpreter (CPU run); on a GPU the kernels compile by running")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with use_launch_config(heuristic_config("gpu", sm_count=132)), LaunchRecorder() as rec:
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


@pytest.mark.parametrize("op", ["batched_gemm", "decode_attention"])
def test_serial_split_k_ptx_orders_stores_barrier_atomic_loads(device, op):
    """The memory-ordering pattern of the serial split-K (CUTLASS's serial split-K semaphore), as
    compiled for sm_90: every partial store, then a CTA barrier, then one thread's gpu-scope
    acq_rel atomic, then a barrier, then the partials read through L2 (ld.global.cg)."""
    pytest.importorskip("triton")
    if device != "cpu":
        pytest.skip("records through the interpreter")
    from gpu_compile import LaunchRecorder
    from sm90_resources import as_on_gpu, compile_records

    bf = torch.bfloat16
    with as_on_gpu(), LaunchRecorder(dry=True) as rec:
        if op == "batched_gemm":
            from cqil_kernels.ops.batched_gemm import batched_gemm_triton

            batched_gemm_triton(torch.empty(2, 1, 4096, dtype=bf), [torch.empty(4096, 4096, dtype=bf) for _ in range(2)])
        else:
            from cqil_kernels.ops.decode_attention import decode_attention_triton

            kb = torch.empty(2, 1, 3, 2112, 64, dtype=bf)
            decode_attention_triton(torch.empty(1, 18, 64, dtype=bf), list(kb.unbind(0)), list(kb.unbind(0)),
                                    torch.ones(1, 2112, dtype=torch.bool), 2112, 0.125)
    records = [dict(r, keep_ptx=True) for r in rec.unique() if "SERIAL" in r["kwargs"]]
    assert records and all(r["kwargs"]["SERIAL"]["value"] for r in records)
    (result,) = compile_records(records, arch=90, ptxas_info=False)
    lines = [ln.strip() for ln in result["ptx"].splitlines()]
    atom = next(i for i, ln in enumerate(lines) if "atom.global.gpu.acq_rel.add" in ln)
    stores = [i for i, ln in enumerate(lines[:atom]) if "st.global" in ln]
    barrier_before = [i for i, ln in enumerate(lines[:atom]) if ln.startswith("bar.sync")]
    assert stores and barrier_before and barrier_before[-1] > stores[-1], "no CTA barrier between partial stores and the atomic"
    assert lines[atom].startswith("@%p"), "the arrival atomic must be issued by one thread"
    after = lines[atom + 1:]
    barrier_after = next(i for i, ln in enumerate(after) if ln.startswith("bar.sync"))
    partial_loads = [i for i, ln in enumerate(after) if "ld.global.cg" in ln]
    assert partial_loads and partial_loads[0] > barrier_after, "partials read before the arrival count is shared"


def _decode_gemm_launches(bypass: int):
    """Dry-recorded decode (M = 1) launches of every GEMM op at Llama-7B shapes, P = 2 (bf16)."""
    from gpu_compile import LaunchRecorder
    from sm90_resources import as_on_gpu

    from cqil_kernels.ops.batched_gemm import batched_gemm_triton
    from cqil_kernels.ops.down_sum import down_sum_triton
    from cqil_kernels.ops.gate_up import gate_up_silu_triton
    from cqil_kernels.ops.qkv_gemm import qkv_gemm_triton

    bf = torch.bfloat16
    e = lambda *s: torch.empty(*s, dtype=bf)  # noqa: E731
    P, H, I = 2, 4096, 11008
    with as_on_gpu(), LaunchRecorder(dry=True) as rec:
        x = e(1, H)
        qkv_gemm_triton(x, [e(H) for _ in range(P)], [e(H, H) for _ in range(3 * P)], None, 1e-6)
        batched_gemm_triton(e(P, 1, H), [e(H, H) for _ in range(P)])
        gate_up_silu_triton(e(P, 1, H), [e(H) for _ in range(P)], [e(I, H) for _ in range(P)],
                            [e(I, H) for _ in range(P)], 1e-6, x, bypass)
        down_sum_triton(e(P, 1, I), [e(H, I) for _ in range(P)], x, e(P, 1, H))
    return [dict(r, keep_ptx=True) for r in rec.unique()]


@pytest.mark.parametrize("bypass", [0, 1])
def test_decode_gemm_k_loops_are_software_pipelined(device, bypass):
    """Every decode GEMM's K loop compiles to asynchronous copies (cp.async) into a multi-stage
    shared-memory ring, for every bypass: weights stream while the previous tile is multiplied.
    A loop Triton cannot pipeline (e.g. a runtime-bounded loop nested inside the K loop, as the
    bypass terms once were) compiles to plain loads and no cp.async."""
    pytest.importorskip("triton")
    if device != "cpu":
        pytest.skip("records through the interpreter")
    from sm90_resources import compile_records

    records = _decode_gemm_launches(bypass)
    names = {r["name"] for r in records}
    assert names >= {"_qkv_gemm_kernel", "_batched_gemm_kernel", "_gate_up_kernel", "_down_sum_kernel"}, names
    for rec, result in zip(records, compile_records(records, arch=90, ptxas_info=True)):
        assert result["ok"], result.get("error")
        if rec["name"] == "_splitk_reduce_kernel":
            continue
        ptx = result["ptx"]
        assert "cp.async" in ptx, f"{result['name']}: K loop not pipelined (no cp.async)"
        assert result["spill_store_bytes"] in (0, None) or result["spill_store_bytes"] <= 8, result
