"""Microbenchmarks of the fused CQIL kernels against cuBLAS / torch baselines, at honest bandwidth.

GPU mode (the real measurement):

    python benchmarks/bench_kernels.py --out results.json [--jsonl rows.jsonl] [--M 1 --P 1 2 4]

times every op on SmolLM2-135M and Llama-7B shapes, M (tokens or batch) in {1, 4, 16}, group size
P in {1, 2, 4}, next to (a) separate cuBLAS GEMMs, one F.linear per layer, and (b) torch mm/bmm on
the stacked weights. Each row reports microseconds, achieved GB/s and its fraction of the read
and copy ceilings measured at the start of the same run (``ceilings.py``).

Honest bandwidth:
- Every op's inputs (weights, activations, caches) exist in several copies that together hold at
  least 3x the L2 (read from the device properties: 50 MB on an H100, 60 MB on an H200), and
  consecutive calls use consecutive copies, so no call finds its weights in L2 from the call
  before. Without this, SmolLM2's ~1 MB weights and a 7B o_proj at P=1 sit in L2 and report L2
  speed.
- Timing: a CUDA graph of R rotating calls (launch overhead excluded, as in the decode loop),
  replayed several times; the median replay / R is the time per call.
- Every implementation is checked against the torch reference before it is timed; a failed check
  is a row (``status: "verify_failed"``) and the run goes on, as does a failed launch
  (``status: "error"``).

``--cpu-smoke`` runs tiny shapes on the CPU (through the Triton interpreter, so the real kernels)
as a quick end-to-end check of this script; its timings mean nothing.

Bytes counted per op (bf16 = 2 bytes; every tensor read or written once, the minimum traffic; the
split-K fp32 workspaces are not counted since they are overhead the kernel chooses):
  qkv_gemm      W P*N*H + norm weights P*H + x M*H + out M*P*N
  batched_gemm  W P*N*K + x P*M*K + out P*M*N
  gate_up_silu  W P*2I*H + norm weights P*H + u P*M*H + residual M*H + out P*M*I
  down_sum      W P*H*I + m P*M*I + residual M*H + attn P*M*H + out M*H
  decode_attn   K,V P*B*nkv*L*D each + q, out B*P*nh*D each (the _static case: a 2L cache, L live,
                only the live L counted)
Weights dominate every GEMM at decode sizes, so GB/s ~ weight bytes / time.

The ops' signatures are changing to per-layer weight lists: each op's weight arguments are built
in ONE function below (``<op>_weights``) and passed as they are to the fused call, so adapting
the benchmark is one edit per op.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

MODELS = {
    # hidden, heads, kv heads, head dim, MLP width, decode kv length used for attention
    "SmolLM2-135M": dict(H=576, nh=9, nkv=3, D=64, I=1536, L=1024),
    "Llama-7B": dict(H=4096, nh=32, nkv=32, D=128, I=11008, L=2048),
}
SMOKE_MODELS = {"tiny": dict(H=48, nh=4, nkv=2, D=12, I=40, L=37)}
ROTATE_L2_MULTIPLE = 3  # copies of each op's inputs hold at least this many L2s
MAX_ROTATION_BYTES = 8 << 30  # but never more than this (a 7B gate_up at P=4 is 0.7 GB a copy)


# ---------------------------------------------------------------------------------------------- verification

def _hi(dtype):
    import torch

    return torch.float64 if dtype == torch.float32 else torch.float32


def _up(obj, dtype):
    if obj is None:
        return None
    if isinstance(obj, (list, tuple)):
        return [_up(o, dtype) for o in obj]
    if not hasattr(obj, "is_floating_point"):  # python scalars (eps, kv_len, scale)
        return obj
    return obj.to(dtype) if obj.is_floating_point() else obj


def verify(name, got, ref_fn, args):
    """The error-budget check of the tests: error vs an upcast reference <= 2x torch's own error
    at the working precision + 4 ulps at the output scale (tests/ops_testing.py says why).
    Returns (ok, error, budget)."""
    import torch

    ref_hi = ref_fn(*_up(list(args), _hi(got.dtype)))
    ref_lo = ref_fn(*args)
    err = (got.double() - ref_hi.double()).abs().max().item()
    terr = (ref_lo.double() - ref_hi.double()).abs().max().item()
    floor = 4 * torch.finfo(got.dtype).eps * max(ref_hi.abs().max().item(), 1e-3)
    budget = 2 * terr + floor
    return bool(err <= budget), err, budget  # NaN fails


# ---------------------------------------------------------------------------------------------- the ops' arguments
# One function per op builds the op's weight arguments for a group of P layers (the place to adapt
# when the signatures change); ``<op>_case`` adds the activations and the implementations.

def qkv_gemm_weights(c, P, rnd, norm):
    """qkv_gemm / qkv_rope_cache weights as a model holds them: P norm weights [H] and each
    layer's own q [nh*D, H], k and v [nkv*D, H] (layer-major list of 3P)."""
    H, D = c["H"], c["D"]
    parts = (c["nh"] * D, c["nkv"] * D, c["nkv"] * D)
    return dict(norm_weight=list(norm(P, H).unbind(0)),
                weight=[rnd(n, H, scale=H ** -0.5) for _ in range(P) for n in parts], bias=None)


def batched_gemm_weights(c, P, rnd, norm):
    """o_proj of P layers: P tensors [H, nh*D]."""
    return dict(weight=[rnd(c["H"], c["nh"] * c["D"], scale=(c["nh"] * c["D"]) ** -0.5) for _ in range(P)])


def gate_up_silu_weights(c, P, rnd, norm):
    """post-attention norm weights (P x [H]), gate and up of P layers (P x [I, H] each)."""
    H, I = c["H"], c["I"]
    return dict(norm_weight=list(norm(P, H).unbind(0)), gate=[rnd(I, H, scale=H ** -0.5) for _ in range(P)],
                up=[rnd(I, H, scale=H ** -0.5) for _ in range(P)])


def down_sum_weights(c, P, rnd, norm):
    """down_proj of P layers: P tensors [H, I]."""
    return dict(weight=[rnd(c["H"], c["I"], scale=(P * c["I"]) ** -0.5) for _ in range(P)])


class Case:
    """One op at one shape: ``make()`` builds a fresh copy of every input (a dict), ``impls``
    maps an implementation's name to ``fn(copy)`` (or ``(make_other, fn)`` for an
    implementation that reads another layout of the weights, e.g. stacked copies), ``check(copy)`` verifies the fused op and
    ``triton(copy, split_k)`` (GEMMs only) runs the kernel with a forced split count."""

    def __init__(self, op, M, P, nbytes, make, impls, check, triton=None, reference=None):
        self.op, self.M, self.P, self.nbytes, self.make, self.impls, self.check = op, M, P, nbytes, make, impls, check
        self.triton, self.reference = triton, reference


def _kernel_reduce(fn, *a, **k):
    """The same op with splitk_mode = "kernel" (separate reduction launch) for the A/B."""
    from cqil_kernels.launch_config import use_launch_config

    with use_launch_config(splitk_mode="kernel"):
        return fn(*a, **k)


def qkv_gemm_case(c, P, M, rnd, norm, eb):
    import torch
    import torch.nn.functional as F

    from cqil_kernels.ops import qkv_gemm, qkv_gemm_reference
    from cqil_kernels.ops.qkv_gemm import qkv_gemm_triton

    H, N = c["H"], (c["nh"] + 2 * c["nkv"]) * c["D"]

    def make():
        return dict(qkv_gemm_weights(c, P, rnd, norm), x=rnd(M, H, scale=3.0))

    def args(d):
        return (d["x"], d["norm_weight"], d["weight"], d["bias"], 1e-6)

    def make_stacked():  # the alternative layout: one [P*N, H] copy of every layer's q/k/v
        d = make()
        d["stacked"] = torch.cat(d["weight"])
        return d

    return Case("qkv_gemm", M, P, eb * (P * N * H + P * H + M * H + M * P * N), make, {
        "triton_fused": lambda d: qkv_gemm(*args(d)),
        "triton_kernel_reduce": lambda d: _kernel_reduce(qkv_gemm, *args(d)),
        "cublas_per_layer": lambda d: [F.linear(d["x"], w) for w in d["weight"]],
        "torch_mm_stacked": (make_stacked, lambda d: F.linear(d["x"], d["stacked"])),
    }, lambda d: verify("qkv_gemm", qkv_gemm(*args(d)), qkv_gemm_reference, args(d)),
        triton=lambda d, k: qkv_gemm_triton(*args(d), split_k=k), reference=lambda d: (qkv_gemm_reference, args(d)))


def qkv_rope_cache_case(c, P, M, rnd, norm, eb):
    """QKV + RoPE + KV-cache write of one decode step (the engine's first two launches), against
    the same math as torch ops (the reference: GEMM, head split, RoPE, index_copy)."""
    import torch

    from cqil_kernels.ops import qkv_rope_cache, qkv_rope_cache_reference

    H, nh, nkv, D = c["H"], c["nh"], c["nkv"], c["D"]
    N = (nh + 2 * nkv) * D

    def make():
        ang = rnd(M, D // 2, scale=30.0).float()
        d = dict(qkv_gemm_weights(c, P, rnd, norm), x=rnd(M, H, scale=3.0),
                 cos=torch.cat([ang, ang], -1).cos().to(ang.device, rnd.dtype),
                 sin=torch.cat([ang, ang], -1).sin().to(ang.device, rnd.dtype),
                 kc=rnd(P, M, nkv, 64, D), vc=rnd(P, M, nkv, 64, D), slot=torch.tensor([17], device=ang.device))
        return d

    def args(d):
        return (d["x"], d["norm_weight"], d["weight"], d["bias"], 1e-6, d["cos"], d["sin"], None, None, 0.0,
                d["kc"], d["vc"], 0, d["slot"], 1, nh)

    return Case("qkv_rope_cache", M, P, eb * (P * N * H + P * H + M * H + M * P * N), make, {
        "triton_fused": lambda d: qkv_rope_cache(*args(d)),
        "torch_ops": lambda d: qkv_rope_cache_reference(*args(d)),
    }, lambda d: verify("qkv_rope_cache", qkv_rope_cache(*args(d)), qkv_rope_cache_reference, args(d)))


def batched_gemm_case(c, P, M, rnd, norm, eb):
    import torch
    import torch.nn.functional as F

    from cqil_kernels.ops import batched_gemm, batched_gemm_reference
    from cqil_kernels.ops.batched_gemm import batched_gemm_triton

    H, K = c["H"], c["nh"] * c["D"]

    def make():
        return dict(batched_gemm_weights(c, P, rnd, norm), x=rnd(P, M, K))

    def args(d):
        return (d["x"], d["weight"])

    def make_stacked():
        d = make()
        d["stacked"] = torch.stack(d["weight"])
        return d

    return Case("batched_gemm", M, P, eb * (P * H * K + P * M * K + P * M * H), make, {
        "triton_fused": lambda d: batched_gemm(*args(d)),
        "triton_kernel_reduce": lambda d: _kernel_reduce(batched_gemm, *args(d)),
        "cublas_per_layer": lambda d: [F.linear(d["x"][j], d["weight"][j]) for j in range(P)],
        "torch_bmm_stacked": (make_stacked, lambda d: torch.bmm(d["x"], d["stacked"].transpose(1, 2))),
    }, lambda d: verify("batched_gemm", batched_gemm(*args(d)), batched_gemm_reference, args(d)),
        triton=lambda d, k: batched_gemm_triton(*args(d), split_k=k), reference=lambda d: (batched_gemm_reference, args(d)))


def gate_up_silu_case(c, P, M, rnd, norm, eb):
    """As the engine calls it: attention outputs + residual, the MLP input formed in the prologue."""
    import torch
    import torch.nn.functional as F

    from cqil_kernels.ops import gate_up_silu, gate_up_silu_reference
    from cqil_kernels.ops.gate_up import gate_up_silu_triton

    H, I = c["H"], c["I"]

    def make():
        return dict(gate_up_silu_weights(c, P, rnd, norm), u=rnd(P, M, H, scale=3.0), res=rnd(M, H, scale=3.0))

    def args(d):
        return (d["u"], d["norm_weight"], d["gate"], d["up"], 1e-6, d["res"], 0)

    def make_stacked():
        d = make()
        d["stacked"] = torch.stack([torch.cat([g, u]) for g, u in zip(d["gate"], d["up"])])  # [P, 2I, H]
        return d

    return Case("gate_up_silu", M, P, eb * (P * 2 * I * H + P * H + P * M * H + M * H + P * M * I), make, {
        "triton_fused": lambda d: gate_up_silu(*args(d)),
        "triton_kernel_reduce": lambda d: _kernel_reduce(gate_up_silu, *args(d)),
        "cublas_per_layer": lambda d: [(F.linear(d["u"][j], d["gate"][j]), F.linear(d["u"][j], d["up"][j]))
                                       for j in range(P)],  # GEMMs only
        "torch_bmm_stacked": (make_stacked, lambda d: torch.bmm(d["u"], d["stacked"].transpose(1, 2))),  # GEMM only
    }, lambda d: verify("gate_up_silu", gate_up_silu(*args(d)), gate_up_silu_reference, args(d)),
        triton=lambda d, k: gate_up_silu_triton(*args(d), split_k=k), reference=lambda d: (gate_up_silu_reference, args(d)))


def down_sum_case(c, P, M, rnd, norm, eb):
    import torch
    import torch.nn.functional as F

    from cqil_kernels.ops import down_sum, down_sum_reference
    from cqil_kernels.ops.down_sum import down_sum_triton

    H, I = c["H"], c["I"]

    def make():
        return dict(down_sum_weights(c, P, rnd, norm), m=rnd(P, M, I), res=rnd(M, H), attn=rnd(P, M, H))

    def args(d):
        return (d["m"], d["weight"], d["res"], d["attn"])

    def make_stacked():
        d = make()
        d["stacked"] = torch.stack(d["weight"])
        return d

    return Case("down_sum", M, P, eb * (P * H * I + P * M * I + M * H + P * M * H + M * H), make, {
        "triton_fused": lambda d: down_sum(*args(d)),
        "triton_kernel_reduce": lambda d: _kernel_reduce(down_sum, *args(d)),
        "cublas_per_layer": lambda d: [F.linear(d["m"][j], d["weight"][j]) for j in range(P)],  # GEMMs only
        "torch_bmm_sum": (make_stacked, lambda d: d["res"] + d["attn"].sum(0)
                          + torch.bmm(d["m"], d["stacked"].transpose(1, 2)).sum(0)),
    }, lambda d: verify("down_sum", down_sum(*args(d)), down_sum_reference, args(d)),
        triton=lambda d, k: down_sum_triton(*args(d), split_k=k), reference=lambda d: (down_sum_reference, args(d)))


def decode_attention_case(c, P, M, rnd, norm, eb):
    """M plays the batch size, one new token per sequence; the caches are views of one buffer."""
    import torch.nn.functional as F

    from cqil_kernels.ops import decode_attention, decode_attention_reference

    nh, nkv, D, L = c["nh"], c["nkv"], c["D"], c["L"]
    B = M
    gqa = dict(enable_gqa=True) if nkv != nh else {}

    def make():
        kb, vb = rnd(P, B, nkv, L, D), rnd(P, B, nkv, L, D)
        return dict(ks=list(kb.unbind(0)), vs=list(vb.unbind(0)), q=rnd(B, P * nh, D))

    def args(d):
        return (d["q"], d["ks"], d["vs"], None, L, D ** -0.5)

    def sdpa(d):
        qs = [d["q"][:, j * nh:(j + 1) * nh, None, :] for j in range(P)]
        return [F.scaled_dot_product_attention(qs[j], d["ks"][j], d["vs"][j], scale=D ** -0.5, **gqa) for j in range(P)]

    return Case("decode_attention", M, P, eb * (2 * P * B * nkv * L * D + 2 * B * P * nh * D), make, {
        "triton_fused": lambda d: decode_attention(*args(d)),
        "triton_kernel_combine": lambda d: _kernel_reduce(decode_attention, *args(d)),
        "sdpa_per_layer": sdpa,
    }, lambda d: verify("decode_attention", decode_attention(*args(d)), decode_attention_reference, args(d)))


def decode_attention_static_case(c, P, M, rnd, norm, eb):
    """As the engine calls it under a CUDA graph: a static cache of 2L slots (kv_len = 2L sizes
    the launch), L of them live (``last_pos`` on the device), the rest NaN. Bytes counted: the
    live L only, so GB/s near decode_attention's means the dead half costs nothing."""
    import torch

    from cqil_kernels.ops import decode_attention, decode_attention_reference

    nh, nkv, D, L = c["nh"], c["nkv"], c["D"], c["L"]
    B = M

    def make():
        kb, vb = rnd(P, B, nkv, 2 * L, D), rnd(P, B, nkv, 2 * L, D)
        kb[:, :, :, L:] = float("nan")
        vb[:, :, :, L:] = float("nan")
        return dict(ks=list(kb.unbind(0)), vs=list(vb.unbind(0)), q=rnd(B, P * nh, D),
                    last=torch.tensor([L - 1], device=kb.device))

    def args(d):
        return (d["q"], d["ks"], d["vs"], None, 2 * L, D ** -0.5, d["last"])

    def ref(q, ks, vs, mask, kv_len, scale, last):  # the live prefix, without the NaN half
        return decode_attention_reference(q, [k[:, :, :L] for k in ks], [v[:, :, :L] for v in vs], None, L, scale)

    return Case("decode_attention_static", M, P, eb * (2 * P * B * nkv * L * D + 2 * B * P * nh * D), make, {
        "triton_fused": lambda d: decode_attention(*args(d)),
        "triton_kernel_combine": lambda d: _kernel_reduce(decode_attention, *args(d)),
    }, lambda d: verify("decode_attention_static", decode_attention(*args(d)), ref, args(d)))


CASES = {"qkv_gemm": qkv_gemm_case, "qkv_rope_cache": qkv_rope_cache_case, "batched_gemm": batched_gemm_case,
         "gate_up_silu": gate_up_silu_case, "down_sum": down_sum_case, "decode_attention": decode_attention_case,
         "decode_attention_static": decode_attention_static_case}


class Rand:
    """Random tensors of one dtype/device from one seeded CPU generator (reproducible inputs)."""

    def __init__(self, dtype, device, seed=0):
        import torch

        self.dtype, self.device = dtype, device
        # on the device: the rotated copies of a case hold >= 3x L2 (180 MB on an H200), too slow
        # to draw on the CPU for every case
        self.g = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, *shape, scale=1.0):
        import torch

        t = torch.randn(*shape, generator=self.g, device=self.device, dtype=torch.float32)
        return (t * scale).to(self.dtype)

    def norm(self, P, H):
        import torch

        # around 1 like trained RMSNorm weights, distinct per layer
        return (0.5 + torch.rand(P, H, generator=self.g, device=self.device)).to(self.dtype)


def cases(model, cfg, Ms, Ps, dtype, device, ops=None):
    """Every (op, M, P) case of one model shape."""
    import torch

    rnd = Rand(dtype, device)
    eb = torch.finfo(dtype).bits // 8
    for P in Ps:
        for M in Ms:
            for op, build in CASES.items():
                if ops is None or op in ops:
                    yield build(cfg, P, M, rnd, rnd.norm, eb)


# ---------------------------------------------------------------------------------------------- timing

def _tensor_bytes(obj) -> int:
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return obj.numel() * obj.element_size() if hasattr(obj, "numel") else 0


def copies_needed(copy_bytes: int, l2: int | None) -> int:
    """Copies of an op's inputs so that together they hold ROTATE_L2_MULTIPLE x L2 (2 without an L2
    figure, i.e. on the CPU), capped at MAX_ROTATION_BYTES."""
    if l2 is None:
        return 2
    want = math.ceil(ROTATE_L2_MULTIPLE * l2 / max(copy_bytes, 1))
    cap = max(1, MAX_ROTATION_BYTES // max(copy_bytes, 1))
    return max(1, min(want, cap))


class Timer:
    """Time ``fn(copy)`` over rotating copies; returns dict(us=..., method=..., runs_us=[...])."""

    def __init__(self, device: str, quick: bool):
        self.cuda = device == "cuda"
        self.quick = quick

    def __call__(self, fn, copies):
        if not self.cuda:
            fn(copies[0])  # discard the first (compile / warm-up) run
            n = 2 if self.quick else 4
            t0 = time.perf_counter()
            for i in range(n):
                fn(copies[i % len(copies)])
            return dict(us=(time.perf_counter() - t0) / n * 1e6, method="perf_counter (interpreter)")
        try:
            return self._graph(fn, copies)
        except Exception as e:  # noqa: BLE001 - a op that cannot be captured is timed eagerly
            out = self._eager(fn, copies)
            out["graph_error"] = f"{type(e).__name__}: {e}"[:300]
            return out

    def _graph(self, fn, copies):
        import torch

        k = len(copies)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for d in copies[: min(k, 3)]:
                fn(d)  # JIT, cuBLAS handles, workspaces, outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        # calls per graph: every copy at least once, and enough calls that a replay is >> its launch
        reps = k * max(1, math.ceil((20 if self.quick else 50) / k))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(reps):
                fn(copies[i % k])
        graph.replay()
        torch.cuda.synchronize()
        runs = []
        for _ in range(5 if self.quick else 15):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            runs.append(a.elapsed_time(b) * 1e3 / reps)
        del graph
        return dict(us=statistics.median(runs), us_min=min(runs), runs=len(runs), calls_per_graph=reps,
                    method="CUDA graph of rotating calls, median replay")

    def _eager(self, fn, copies):
        import torch

        k = len(copies)
        fn(copies[0])
        torch.cuda.synchronize()
        runs = []
        for r in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for i in range(k):
                fn(copies[(r + i) % k])
            b.record()
            b.synchronize()
            runs.append(a.elapsed_time(b) * 1e3 / k)
        return dict(us=statistics.median(runs), method="eager rotating calls (launch overhead included)")


# ---------------------------------------------------------------------------------------------- run

def measure_ceilings(device: str) -> dict:
    sys.path.insert(0, HERE)
    import ceilings

    nbytes = None if device == "cuda" else 16 << 20
    return dict(read=ceilings.measure_read_bandwidth(device, nbytes), copy=ceilings.measure_copy_bandwidth(device, nbytes),
                l2_bytes=ceilings.l2_bytes(device))


def run(models, Ms, Ps, device, quick, emit=print, ops=None, ceiling=None, hot=False):
    """Measure every case; ``emit(status, row)`` gets each row as soon as it is measured.

    ``ceiling``: dict(read=..., copy=..., l2_bytes=...) from :func:`measure_ceilings` (measured
    here when None). ``hot``: time without rotation (weights may sit in L2), for comparison.
    Returns the rows.
    """
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    from cqil_kernels.report import environment

    meta = dict(environment(device), dtype=str(dtype).removeprefix("torch."))
    if device != "cuda":
        meta["device"] += " (Triton interpreter)"
    ceiling = ceiling or measure_ceilings(device)
    read_gbps, copy_gbps, l2 = ceiling["read"]["gbps"], ceiling["copy"]["gbps"], ceiling.get("l2_bytes")
    emit("ok", dict(meta, kind="ceilings", read_gbps=read_gbps, copy_gbps=copy_gbps, l2_bytes=l2,
                    read=ceiling["read"], copy=ceiling["copy"]))
    timer = Timer(device, quick)
    rows = []
    from cqil_kernels.launch_config import use_launch_config

    # the public ops would hand prefill-sized GEMMs to cuBLAS (LaunchConfig.prefill_m): here the
    # kernels are timed at every size, cuBLAS through the references beside them
    with use_launch_config(prefill_m=None):
        _run_models(models, Ms, Ps, device, dtype, meta, timer, rows, ops, hot, l2, read_gbps, copy_gbps, emit)
    return rows


def _run_models(models, Ms, Ps, device, dtype, meta, timer, rows, ops, hot, l2, read_gbps, copy_gbps, emit):
    import torch

    for model, cfg in models.items():
        for case in cases(model, cfg, Ms, Ps, dtype, device, ops):
            base = dict(meta, model=model, op=case.op, M=case.M, P=case.P, bytes=case.nbytes)
            try:
                first = case.make()
                n = 1 if hot else copies_needed(_tensor_bytes(first), l2)
                copies = [first] + [case.make() for _ in range(n - 1)]
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: a row, and on
                row = dict(base, impl="inputs", status="error", error=f"{type(e).__name__}: {e}"[:500])
                rows.append(row)
                emit("error", row)
                continue
            rot = dict(copies=len(copies), rotation_bytes=_tensor_bytes(copies[0]) * len(copies))
            try:
                ok, err, budget = case.check(copies[0])
                vrow = dict(base, impl="verify", status="ok" if ok else "verify_failed", max_err_vs_ref=err, budget=budget)
            except Exception as e:  # noqa: BLE001 - a kernel that fails to launch is a row
                ok, vrow = False, dict(base, impl="verify", status="error", error=f"{type(e).__name__}: {e}"[:500])
            rows.append(vrow)
            emit("ok" if ok else "fail", vrow)
            for impl, fn in case.impls.items():
                try:
                    if isinstance(fn, tuple):  # an alternative layout: its own inputs, rotated alike
                        maker, fn = fn
                        t = timer(fn, [maker() for _ in range(len(copies))])
                    else:
                        t = timer(fn, copies)
                except Exception as e:  # noqa: BLE001
                    row = dict(base, impl=impl, status="error", error=f"{type(e).__name__}: {e}"[:500])
                    rows.append(row)
                    emit("error", row)
                    continue
                gbps = case.nbytes / (t["us"] * 1e-6) / 1e9
                row = dict(base, impl=impl, status="ok", verified=ok if impl.startswith("triton") else None,
                           us=round(t["us"], 3), GBps=round(gbps, 1), frac_of_read=round(gbps / read_gbps, 3),
                           frac_of_copy=round(gbps / copy_gbps, 3), read_ceiling_gbps=round(read_gbps, 1),
                           hot=hot, **rot, **{k: v for k, v in t.items() if k != "us"})
                rows.append(row)
                emit("ok", row)
            del copies, first
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _print_row(status, row):
    if row.get("kind") == "ceilings":
        print(f"ceilings: read {row['read_gbps']:.1f} GB/s, copy {row['copy_gbps']:.1f} GB/s, L2 {row['l2_bytes']}", flush=True)
        return
    head = f"{row['model']:13s} {row['op']:17s} {row['impl']:22s} M={row['M']:<3d} P={row['P']}"
    if row["impl"] == "verify" or row.get("status") != "ok":
        what = row.get("error") or f"err {row.get('max_err_vs_ref', float('nan')):.3e} (budget {row.get('budget', float('nan')):.1e})"
        print(f"{head} {row.get('status', status):>14s} {what}", flush=True)
        return
    print(f"{head} {row['us']:10.2f} us {row['GBps']:8.1f} GB/s ({row['frac_of_read']:.0%} of read, "
          f"{row['copies']} copies)", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results.json", help="JSON file for the result rows")
    ap.add_argument("--jsonl", default=None, help="also append each row to this JSONL file as it is measured")
    ap.add_argument("--step", default="kernels", help="step name of the JSONL lines")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes on the CPU through the Triton interpreter (checks the script only)")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--ops", nargs="*", default=None, choices=list(CASES))
    ap.add_argument("--M", nargs="*", type=int, default=[1, 4, 16])
    ap.add_argument("--P", nargs="*", type=int, default=[1, 2, 4])
    ap.add_argument("--quick", action="store_true", help="shorter timing runs")
    ap.add_argument("--hot", action="store_true", help="no rotation: one copy of the inputs (L2-resident when small)")
    args = ap.parse_args(argv)
    if ROOT not in sys.path:  # run from a checkout without installing
        sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    from step_log import StepLog

    log = StepLog(args.jsonl, args.step)

    def emit(status, row):
        log.emit(status, row)
        _print_row(status, row)

    if args.cpu_smoke:
        # Must be set before cqil_kernels.ops decorates its kernels (imported lazily in the cases).
        os.environ["TRITON_INTERPRET"] = "1"
        rows = run(SMOKE_MODELS, [1, 3] if args.M == [1, 4, 16] else args.M, [1, 2] if args.P == [1, 2, 4] else args.P,
                   "cpu", quick=True, emit=emit, ops=args.ops, hot=args.hot)
    else:
        import torch

        if not torch.cuda.is_available():
            print("bench_kernels.py: no CUDA device; these benchmarks need an NVIDIA GPU "
                  "(use --cpu-smoke for a quick interpreter check of the script).", file=sys.stderr)
            return 2
        rows = run({m: MODELS[m] for m in args.models}, args.M, args.P, "cuda", args.quick, emit=emit, ops=args.ops,
                   hot=args.hot)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    bad = [r for r in rows if r.get("status") != "ok"]
    print(f"wrote {len(rows)} rows to {args.out}; {len(bad)} failed or errored")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
