"""pytest-benchmark part for small CPU sizes (collected only with ``pytest benchmarks/``).

On the CPU the public ops run their torch reference (the CPU fallback) unless TRITON_INTERPRET=1
was set before import, in which case they run the interpreted kernels; either way these numbers
only track regressions of the fallback path and the per-layer baseline, not GPU performance
(that is ``python benchmarks/bench_kernels.py`` on an H100).
"""

import pytest
import torch
import torch.nn.functional as F

SHAPE = dict(M=4, H=96, N=160, I=200, P=2, nh=4, nkv=2, D=24, L=64)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    s = SHAPE
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(
        x=r(s["M"], s["H"]), g1=1 + 0.1 * r(s["P"], s["H"]), w_qkv=r(s["P"] * s["N"], s["H"]) / 10,
        u=r(s["P"], s["M"], s["H"]), w_gu=r(s["P"], 2 * s["I"], s["H"]) / 10,
        m=r(s["P"], s["M"], s["I"]), w_d=r(s["P"], s["H"], s["I"]) / 15, attn=r(s["P"], s["M"], s["H"]),
        q=r(s["M"], s["P"] * s["nh"], s["D"]), kv=r(2, s["P"], s["M"], s["nkv"], s["L"], s["D"]),
    )


def test_bench_qkv_gemm(benchmark, data):
    from cqil_kernels.ops import qkv_gemm, qkv_gemm_reference

    args = (data["x"], data["g1"], data["w_qkv"], None, 1e-6)
    out = benchmark(qkv_gemm, *args)
    torch.testing.assert_close(out, qkv_gemm_reference(*args), rtol=1e-4, atol=1e-4)


def test_bench_qkv_per_layer_linear(benchmark, data):
    P, N = SHAPE["P"], SHAPE["N"]
    ws = [data["w_qkv"][j * N:(j + 1) * N] for j in range(P)]
    benchmark(lambda: [F.linear(data["x"], w) for w in ws])


def test_bench_gate_up_silu(benchmark, data):
    from cqil_kernels.ops import gate_up_silu, gate_up_silu_reference

    args = (data["u"], data["g1"], data["w_gu"], 1e-6)
    out = benchmark(gate_up_silu, *args)
    torch.testing.assert_close(out, gate_up_silu_reference(*args), rtol=1e-4, atol=1e-4)


def test_bench_down_sum(benchmark, data):
    from cqil_kernels.ops import down_sum, down_sum_reference

    args = (data["m"], data["w_d"], data["x"], data["attn"])
    out = benchmark(down_sum, *args)
    torch.testing.assert_close(out, down_sum_reference(*args), rtol=1e-4, atol=1e-4)


def test_bench_decode_attention(benchmark, data):
    from cqil_kernels.ops import decode_attention, decode_attention_reference

    ks, vs = list(data["kv"][0].unbind(0)), list(data["kv"][1].unbind(0))
    args = (data["q"], ks, vs, None, SHAPE["L"], SHAPE["D"] ** -0.5)
    out = benchmark(decode_attention, *args)
    torch.testing.assert_close(out, decode_attention_reference(*args), rtol=1e-4, atol=1e-4)
