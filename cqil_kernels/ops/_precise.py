"""Correctly rounded fp32 forms of the epilogues' divisions and square roots."""

from ._triton import tl, triton

# On sm_90, Triton compiles ``1.0 / tl.sqrt(x)`` to
# sqrt.approx + div.full and ``tl.sigmoid`` to ex2.approx + div.full: non-IEEE results a couple of
# ulps off, where torch divides and takes square roots exactly (its rsqrt and exp are approximate
# too). Emulated in the interpreter at 2 ulps per approximate instruction, the fp32 kernel tests'
# error budgets (2x torch's error + 4 ulps) fail in gate_up_silu and decode_attention because of the
# divisions, and pass with every division and square root exact and only exp2/exp approximate
# (benchmarks/NOTES.md, "Numerics on the GPU"). These cost a few instructions per output element,
# once per epilogue; inner loops keep exp2.


@triton.jit
def rsqrt_rn(x):
    """1 / sqrt(x), each step correctly rounded (div.rn / sqrt.rn on the GPU); any shape."""
    return tl.div_rn(tl.full(x.shape, 1.0, tl.float32), tl.sqrt_rn(x))


@triton.jit
def sigmoid_rn(x):
    """1 / (1 + exp(-x)) with a correctly rounded division (exp stays approximate); any shape.
    The same sums as ``tl.sigmoid`` under the interpreter."""
    return tl.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + tl.exp(-x))
