"""fp32 numerics of the compiled kernels: which instructions are approximate on sm_90, and that the
fp32 error budgets hold with them.

On sm_90 Triton compiles ``tl.exp2``/``tl.exp`` to ex2.approx, ``tl.sqrt`` to sqrt.approx and
fp32 ``/`` to div.full (about 2 ulps, not IEEE); ``tl.sqrt_rn``/``tl.div_rn`` are the IEEE forms
(sqrt.rn, div.rn). The interpreter computes all of them exactly, so a CPU run cannot see the
difference. Two checks without a GPU:

- the sm_90 PTX of each kernel contains no approximate division or square root (only ex2.approx
  may remain): compiled here, read, asserted;
- the fp32 kernel tests' error budget (2x torch's error + 4 ulps) still holds when every result
  of exp2/exp is perturbed by 2 ulps in the interpreter (the approximation kept in the kernels).
  With the divisions perturbed too, gate_up_silu and decode_attention cases fail that budget
  (measured, benchmarks/NOTES.md "Numerics on the GPU"): hence the precise forms.
"""

import contextlib
import functools
import os
import re
import sys

import numpy as np
import pytest
import torch

from ops_testing import assert_error_budget, hi_dtype, layer_tensors, norm_weights, randn, upcast

pytestmark = [pytest.mark.interpreter]

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

APPROX = re.compile(r"\b(div\.full|div\.approx|sqrt\.approx|rsqrt\.approx|rcp\.approx)\.\S*")


def _record_kernels():
    """Every kernel with an fp32 epilogue, at SmolLM2 shapes: decode attention (serial split, and
    kernel-mode split + combine), the split-K reduction with each epilogue (norm, GLU, residual +
    attention), and the GEMM kernels' own epilogues (unsplit: qkv with norm, gate_up; the RoPE
    kernel with rstd and Qwen3 q/k norm)."""
    from cqil_kernels.launch_config import use_launch_config
    from cqil_kernels.ops.decode_attention import decode_attention_triton
    from cqil_kernels.ops.down_sum import down_sum_triton
    from cqil_kernels.ops.gate_up import gate_up_silu_triton
    from cqil_kernels.ops.qkv_gemm import qkv_gemm_triton
    from cqil_kernels.ops.qkv_rope_cache import qkv_rope_cache_triton

    bf = torch.bfloat16
    e = lambda *s: torch.empty(*s, dtype=bf)  # noqa: E731
    kb = e(2, 1, 3, 2112, 64)
    x, g = e(1, 576), [e(576) for _ in range(2)]
    qkv = [w for _ in range(2) for w in (e(9 * 64, 576), e(3 * 64, 576), e(3 * 64, 576))]
    for mode in ("serial", "kernel"):  # the serial finish's epilogues, and the reduction kernel's
        with use_launch_config(splitk_mode=mode):
            decode_attention_triton(e(1, 18, 64), list(kb.unbind(0)), list(kb.unbind(0)),
                                    torch.ones(1, 2112, dtype=torch.bool), 2112, 0.125, torch.tensor([300]))
            for split in (4, 1):
                qkv_gemm_triton(x, g[:1], [e(49152, 576)], None, 1e-6, split_k=split)
                gate_up_silu_triton(e(2, 1, 576), g, [e(1536, 576) for _ in range(2)],
                                    [e(1536, 576) for _ in range(2)], 1e-6, x, 0, split_k=split)
            down_sum_triton(e(2, 1, 1536), [e(576, 1536) for _ in range(2)], x, e(2, 1, 576), split_k=4)
    qkv_rope_cache_triton(x, g, qkv, None, 1e-6, e(1, 64), e(1, 64), [e(64) for _ in range(2)],
                          [e(64) for _ in range(2)], 1e-6, e(2, 1, 3, 64, 64), e(2, 1, 3, 64, 64), 0,
                          torch.zeros(1, dtype=torch.long), 1, 9)


@functools.lru_cache(maxsize=None)
def _sm90_approximations():
    """{kernel: sorted approximate division/sqrt instructions in its sm_90 PTX} (all variants),
    and the decode attention's PTX."""
    from gpu_compile import LaunchRecorder
    from sm90_resources import as_on_gpu, compile_records

    with as_on_gpu(), LaunchRecorder(dry=True) as rec:
        _record_kernels()
    found, attn_ptx = {}, ""
    for r in compile_records([dict(r, keep_ptx=True) for r in rec.unique()], 90, False):
        assert r["ok"], r.get("error")
        name = r["name"].split("[")[0]
        found.setdefault(name, set()).update(m.group(0) for m in APPROX.finditer(r["ptx"]))
        if name == "_decode_attn_kernel":
            attn_ptx = r["ptx"]
    return {k: sorted(v) for k, v in found.items()}, attn_ptx


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [
    "_decode_attn_kernel", "_decode_combine_kernel", "_splitk_reduce_kernel",
    "_qkv_gemm_kernel", "_gate_up_kernel", "_rope_cache_kernel", "_down_sum_kernel",
])
def test_no_approximate_division_or_sqrt_on_sm90(device, kernel):
    pytest.importorskip("triton")
    if device != "cpu":
        pytest.skip("compiles through the interpreter's launch records")
    found, attn_ptx = _sm90_approximations()
    assert "ex2.approx" in attn_ptx  # the check reads real PTX
    assert kernel in found, sorted(found)
    assert not found[kernel], f"{kernel}: approximate fp32 instructions {found[kernel]}"


# ---------------------------------------------------------------------------------------------- emulation

@contextlib.contextmanager
def approximate(ops=("exp2", "exp"), ulps=2.0, seed=0):
    """Perturb every fp32 result of the interpreter's ``create_<op>`` by +-``ulps`` ulps (random
    sign per element, fixed seed): the accuracy class of sm_90's ex2.approx / div.full."""
    from triton.runtime import interpreter
    from triton.runtime.interpreter import TensorHandle

    builder = interpreter.interpreter_builder
    rng = np.random.default_rng(seed)
    saved = {op: getattr(builder, f"create_{op}") for op in ops}

    def wrap(fn):
        def approx(*args):
            h = fn(*args)
            if h.data.dtype != np.float32:
                return h
            sign = rng.choice([-1.0, 1.0], size=h.data.shape)
            return TensorHandle((h.data.astype(np.float64) * (1 + sign * ulps * 2.0 ** -23)).astype(np.float32), h.dtype.scalar)
        return approx

    for op, fn in saved.items():
        setattr(builder, f"create_{op}", wrap(fn))
    try:
        yield
    finally:
        for op in saved:
            delattr(builder, f"create_{op}")  # back to the class's own method


@pytest.mark.parametrize("B,P,NH,NKV,D,S,live,num_splits", [
    (1, 4, 6, 2, 8, 160, 1, 5),     # a single live slot: the output is one V row, no error to hide in
    (2, 3, 3, 1, 12, 130, 64, 3),
    (1, 2, 4, 2, 16, 200, 200, 4),
])
def test_decode_attention_fp32_budget_holds_with_approximate_exp2(device, B, P, NH, NKV, D, S, live, num_splits):
    from test_ops_decode_attention import _check_live

    if device != "cpu":
        pytest.skip("emulates the GPU's approximations in the interpreter")
    with approximate():
        _check_live(device, torch.float32, B, P, NH, NKV, D, S, live, True, False, num_splits)


@pytest.mark.parametrize("op", ["qkv_gemm", "gate_up_silu"])
@pytest.mark.parametrize("M,H", [(1, 70), (3, 63), (17, 129)])
def test_splitk_reduce_fp32_budget_holds_with_approximate_exp(device, monkeypatch, request, op, M, H):
    """The split-K reduction's epilogues (rstd, SiLU) in "kernel" mode, with exp approximate."""
    from cqil_kernels.ops import gate_up_silu_reference, qkv_gemm_reference
    from ops_testing import launch_config_for_test
    from cqil_kernels.ops.gate_up import gate_up_silu_triton
    from cqil_kernels.ops.qkv_gemm import qkv_gemm_triton

    if device != "cpu":
        pytest.skip("emulates the GPU's approximations in the interpreter")
    launch_config_for_test(request, splitk_mode="kernel")
    g = torch.Generator().manual_seed(M * 100 + H)
    P, N, I = 2, 36, 20
    dt, hi = torch.float32, hi_dtype(torch.float32)
    if op == "qkv_gemm":
        args = (randn(M, H, dtype=dt, device=device, scale=3.0, generator=g), norm_weights(P, H, dt, device, g),
                layer_tensors(P, (N, H), dt, device, 1.0, g), None, 1e-6)
        with approximate():
            out = qkv_gemm_triton(*args, split_k=3)
        ref = qkv_gemm_reference
    else:
        args = (randn(P, M, H, dtype=dt, device=device, scale=3.0, generator=g), norm_weights(P, H, dt, device, g),
                layer_tensors(P, (I, H), dt, device, 1.0, g), layer_tensors(P, (I, H), dt, device, 1.0, g), 1e-6)
        with approximate():
            out = gate_up_silu_triton(*args, split_k=3)
        ref = gate_up_silu_reference
    up = [a if isinstance(a, float) or a is None else upcast(a, hi) for a in args]
    assert_error_budget(out, ref(*up), ref(*args))
