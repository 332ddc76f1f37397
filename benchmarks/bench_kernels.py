"""Microbenchmarks of the fused CQIL kernels against cuBLAS / torch baselines.

GPU mode (the real measurement):

    python benchmarks/bench_kernels.py --out results.json

times every op on SmolLM2-135M and Llama-7B shapes, M (tokens or batch) in {1, 4, 16}, group size
P in {1, 2, 4}, next to (a) separate cuBLAS GEMMs, one F.linear per layer, and (b) torch mm/bmm on
the stacked weights. Each row reports microseconds, achieved GB/s and the fraction of the measured
3.05 TB/s H100 read ceiling. Every implementation's output is checked against the torch
reference before it is timed; a failed check aborts the run.

``--cpu-smoke`` runs tiny shapes on the CPU (through the Triton interpreter, so the real kernels)
as a quick end-to-end check of this script; its timings mean nothing.

Bytes counted per op (bf16 = 2 bytes; every tensor read or written once, the minimum traffic; the
split-K fp32 workspaces are not counted since they are overhead the kernel chooses):
  qkv_gemm      W P*N*H + norm weights P*H + x M*H + out M*P*N
  batched_gemm  W P*N*K + x P*M*K + out P*M*N
  gate_up_silu  W P*2I*H + norm weights P*H + u P*M*H + out P*M*I
  down_sum      W P*H*I + m P*M*I + residual M*H + attn P*M*H + out M*H
  decode_attn   K,V P*B*nkv*L*D each + q, out B*P*nh*D each (+ mask B*L bytes)
Weights dominate every GEMM at decode sizes, so GB/s ~ weight bytes / time.
"""

import argparse
import json
import os
import sys
import time

H100_READ_CEILING_GBPS = 3050.0  # measured H100 read bandwidth (docs/design.md)

MODELS = {
    # hidden, heads, kv heads, head dim, MLP width, decode kv length used for attention
    "SmolLM2-135M": dict(H=576, nh=9, nkv=3, D=64, I=1536, L=1024),
    "Llama-7B": dict(H=4096, nh=32, nkv=32, D=128, I=11008, L=2048),
}
SMOKE_MODELS = {"tiny": dict(H=48, nh=4, nkv=2, D=12, I=40, L=37)}


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
    at the working precision + 4 ulps at the output scale (tests/ops_testing.py says why). Raises
    on failure."""
    import torch

    ref_hi = ref_fn(*_up(list(args), _hi(got.dtype)))
    ref_lo = ref_fn(*args)
    err = (got.double() - ref_hi.double()).abs().max().item()
    terr = (ref_lo.double() - ref_hi.double()).abs().max().item()
    floor = 4 * torch.finfo(got.dtype).eps * max(ref_hi.abs().max().item(), 1e-3)
    if not err <= 2 * terr + floor:  # also catches NaN
        raise AssertionError(f"{name}: error {err:.3e} > 2 x torch error {terr:.3e} + {floor:.1e}")
    return err


def _timer(device, quick):
    if device == "cuda":
        import triton.testing

        def t(fn):
            # CUDA graph replay: launch overhead excluded, as in the decode loop; do_bench* sync
            # around the timed region. Falls back to do_bench if capture is not possible.
            try:
                return triton.testing.do_bench_cudagraph(fn, rep=100 if quick else 300) * 1e3
            except Exception:
                return triton.testing.do_bench(fn, warmup=25, rep=100 if quick else 300) * 1e3
        return t

    def t(fn):
        fn()  # discard the first (compile / warm-up) run
        n = 3
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e6
    return t


def _cases(model, cfg, Ms, Ps, dtype, device):
    """Yield (op, M, P, bytes, {impl: fn}, verify) for every op and shape."""
    import torch
    import torch.nn.functional as F

    from cqil_kernels.launch_config import use_launch_config
    from cqil_kernels.ops import (
        batched_gemm, batched_gemm_reference, decode_attention, decode_attention_reference, down_sum,
        down_sum_reference, gate_up_silu, gate_up_silu_reference, qkv_gemm, qkv_gemm_reference, qkv_rope_cache,
        qkv_rope_cache_reference,
    )

    def kernel_reduce(fn, *a):
        """The same op with splitk_mode = "kernel" (separate reduction launch) for the A/B."""
        with use_launch_config(splitk_mode="kernel"):
            return fn(*a)

    H, nh, nkv, D, I, L = (cfg[k] for k in ("H", "nh", "nkv", "D", "I", "L"))
    N = (nh + 2 * nkv) * D
    eb = torch.finfo(dtype).bits // 8
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    for P in Ps:
        w_qkv = rnd(P * N, H, scale=H ** -0.5)
        w_o = rnd(P, H, nh * D, scale=(nh * D) ** -0.5)
        w_gu = rnd(P, 2 * I, H, scale=H ** -0.5)
        w_d = rnd(P, H, I, scale=(P * I) ** -0.5)
        g1 = (0.5 + torch.rand(P, H, generator=g)).to(device=device, dtype=dtype)
        g2 = (0.5 + torch.rand(P, H, generator=g)).to(device=device, dtype=dtype)
        for M in Ms:
            x = rnd(M, H, scale=3.0)
            args = (x, g1, w_qkv, None, 1e-6)
            per_layer = [w_qkv[j * N:(j + 1) * N] for j in range(P)]
            yield ("qkv_gemm", M, P, eb * (P * N * H + P * H + M * H + M * P * N), {
                "triton_fused": lambda: qkv_gemm(*args),
                "triton_kernel_reduce": lambda: kernel_reduce(qkv_gemm, *args),
                "cublas_per_layer": lambda: [F.linear(x, w) for w in per_layer],
                "torch_mm_stacked": lambda: F.linear(x, w_qkv),
            }, lambda: verify("qkv_gemm", qkv_gemm(*args), qkv_gemm_reference, args))

            # QKV + RoPE + KV-cache write of one decode step (the engine's first two launches),
            # against the same math as torch ops (the reference: GEMM, head split, RoPE, index_copy)
            kc = rnd(P, M, nkv, 64, D)
            vc = rnd(P, M, nkv, 64, D)
            ang = torch.rand(M, D // 2, generator=g).to(device) * 100
            cos = torch.cat([ang, ang], -1).cos().to(dtype)
            sin = torch.cat([ang, ang], -1).sin().to(dtype)
            slot = torch.tensor([17], device=device)
            args_r = (x, g1, w_qkv, None, 1e-6, cos, sin, None, None, 0.0, kc, vc, 0, slot, 1, nh)
            yield ("qkv_rope_cache", M, P, eb * (P * N * H + P * H + M * H + M * P * N), {
                "triton_fused": lambda: qkv_rope_cache(*args_r),
                "torch_ops": lambda: qkv_rope_cache_reference(*args_r),
            }, lambda: verify("qkv_rope_cache", qkv_rope_cache(*args_r), qkv_rope_cache_reference, args_r))

            xa = rnd(P, M, nh * D)
            args_o = (xa, w_o)
            yield ("batched_gemm", M, P, eb * (P * H * nh * D + P * M * nh * D + P * M * H), {
                "triton_fused": lambda: batched_gemm(*args_o),
                "triton_kernel_reduce": lambda: kernel_reduce(batched_gemm, *args_o),
                "cublas_per_layer": lambda: [F.linear(xa[j], w_o[j]) for j in range(P)],
                "torch_bmm_stacked": lambda: torch.bmm(xa, w_o.transpose(1, 2)),
            }, lambda: verify("batched_gemm", batched_gemm(*args_o), batched_gemm_reference, args_o))

            # as the engine calls it: attention outputs + residual, the MLP input formed in the prologue
            u = rnd(P, M, H, scale=3.0)
            h_res = rnd(M, H, scale=3.0)
            args_gu = (u, g2, w_gu, 1e-6, h_res, 0)
            yield ("gate_up_silu", M, P, eb * (P * 2 * I * H + P * H + P * M * H + M * H + P * M * I), {
                "triton_fused": lambda: gate_up_silu(*args_gu),
                "triton_kernel_reduce": lambda: kernel_reduce(gate_up_silu, *args_gu),
                "cublas_per_layer": lambda: [F.linear(u[j], w_gu[j]) for j in range(P)],  # GEMM only
                "torch_bmm_stacked": lambda: torch.bmm(u, w_gu.transpose(1, 2)),           # GEMM only
            }, lambda: verify("gate_up_silu", gate_up_silu(*args_gu), gate_up_silu_reference, args_gu))

            m = rnd(P, M, I)
            res = rnd(M, H)
            attn = rnd(P, M, H)
            args_d = (m, w_d, res, attn)
            yield ("down_sum", M, P, eb * (P * H * I + P * M * I + M * H + P * M * H + M * H), {
                "triton_fused": lambda: down_sum(*args_d),
                "triton_kernel_reduce": lambda: kernel_reduce(down_sum, *args_d),
                "cublas_per_layer": lambda: [F.linear(m[j], w_d[j]) for j in range(P)],  # GEMMs only
                "torch_bmm_sum": lambda: res + attn.sum(0) + torch.bmm(m, w_d.transpose(1, 2)).sum(0),
            }, lambda: verify("down_sum", down_sum(*args_d), down_sum_reference, args_d))

            # decode attention: M plays the batch size, one new token per sequence
            B = M
            kbuf = rnd(P, B, nkv, L, D)
            vbuf = rnd(P, B, nkv, L, D)
            ks, vs = list(kbuf.unbind(0)), list(vbuf.unbind(0))  # views of one buffer: no copy
            q = rnd(B, P * nh, D)
            args_a = (q, ks, vs, None, L, D ** -0.5)
            qs = [q[:, j * nh:(j + 1) * nh, None, :] for j in range(P)]
            gqa = dict(enable_gqa=True) if nkv != nh else {}
            yield ("decode_attention", M, P, eb * (2 * P * B * nkv * L * D + 2 * B * P * nh * D), {
                "triton_fused": lambda: decode_attention(*args_a),
                "triton_kernel_combine": lambda: kernel_reduce(decode_attention, *args_a),
                "sdpa_per_layer": lambda: [F.scaled_dot_product_attention(qs[j], ks[j], vs[j], scale=D ** -0.5, **gqa)
                                           for j in range(P)],
            }, lambda: verify("decode_attention", decode_attention(*args_a), decode_attention_reference, args_a))


def run(models, Ms, Ps, device, quick):
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    from cqil_kernels.report import environment

    meta = dict(environment(device), dtype=str(dtype))
    if device != "cuda":
        meta["device"] += " (Triton interpreter)"
    timer = _timer(device, quick)
    rows = []
    from cqil_kernels.launch_config import use_launch_config

    # the public ops would hand prefill-sized GEMMs to cuBLAS (LaunchConfig.prefill_m): here the
    # kernels are timed at every size, cuBLAS through the references beside them
    with use_launch_config(prefill_m=None):
        _run_models(models, Ms, Ps, device, dtype, meta, timer, rows)
    return rows


def _run_models(models, Ms, Ps, device, dtype, meta, timer, rows):
    for model, cfg in models.items():
        for op, M, P, nbytes, impls, check in _cases(model, cfg, Ms, Ps, dtype, device):
            err = check()
            for impl, fn in impls.items():
                us = timer(fn)
                gbps = nbytes / (us * 1e-6) / 1e9
                row = dict(meta, model=model, op=op, impl=impl, M=M, P=P, bytes=nbytes, us=round(us, 2),
                           GBps=round(gbps, 1), frac_of_ceiling=round(gbps / H100_READ_CEILING_GBPS, 3),
                           max_err_vs_ref=err if impl == "triton_fused" else None)
                rows.append(row)
                print(f"{model:13s} {op:17s} {impl:18s} M={M:<3d} P={P} {us:10.1f} us {gbps:8.1f} GB/s "
                      f"({row['frac_of_ceiling']:.0%} of {H100_READ_CEILING_GBPS:.0f})", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results.json", help="JSON file for the result rows")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes on the CPU through the Triton interpreter (checks the script only)")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--M", nargs="*", type=int, default=[1, 4, 16])
    ap.add_argument("--P", nargs="*", type=int, default=[1, 2, 4])
    ap.add_argument("--quick", action="store_true", help="shorter timing runs")
    args = ap.parse_args(argv)
    # run from a checkout without installing: make the repository root importable
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)

    if args.cpu_smoke:
        # Must be set before cqil_kernels.ops decorates its kernels (imported lazily in _cases).
        os.environ["TRITON_INTERPRET"] = "1"
        rows = run(SMOKE_MODELS, [1, 3], [1, 2], "cpu", quick=True)
    else:
        import torch

        if not torch.cuda.is_available():
            print("bench_kernels.py: no CUDA device; these benchmarks need an NVIDIA GPU "
                  "(use --cpu-smoke for a quick interpreter check of the script).", file=sys.stderr)
            return 2
        rows = run({m: MODELS[m] for m in args.models}, args.M, args.P, "cuda", args.quick)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
