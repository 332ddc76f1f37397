"""Registers, spills and shared memory of every kernel at the real decode/prefill shapes, for sm_90.

No GPU needed: the ops are called at SmolLM2-135M and Llama-7B shapes in bf16 with the launches
recorded but not run (``gpu_compile.LaunchRecorder(dry=True)``, the H100's launch decisions, the
GPU's dtype paths), then each launch is compiled for the H100 by Triton and ptxas reports its
resources. Spills or a register count that caps occupancy are visible here before any GPU time.

    python benchmarks/sm90_resources.py --out /tmp/sm90.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")  # before cqil_kernels.ops decorates its kernels

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from gpu_compile import LaunchRecorder  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(H=576, nh=9, nkv=3, D=64, I=1536, V=49152),
    "llama-7b": dict(H=4096, nh=32, nkv=32, D=128, I=11008, V=32000),
}


@contextlib.contextmanager
def as_on_gpu(sm_count: int = 132):
    """Launch decisions and dtype paths of a GPU while the tensors stay on the CPU."""
    import importlib

    from cqil_kernels.launch_config import heuristic_config, use_launch_config

    saved = []
    # modules that import interpreted() by name (the package re-exports functions of the same names)
    mods = [importlib.import_module(f"cqil_kernels.ops.{m}")
            for m in ("_triton", "_buffers", "decode_attention", "qkv_rope_cache")]
    for mod in mods:
        saved.append((mod, "interpreted", mod.interpreted))
        mod.interpreted = lambda t: False
    try:
        with use_launch_config(heuristic_config("gpu", sm_count=sm_count)):
            yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def record_real_shapes(recorder: LaunchRecorder, shapes=SHAPES, Ms=(1, 16, 512), Ps=(1, 2)):
    """Call every op at the given model shapes (bf16) inside ``recorder`` (use dry=True)."""
    from cqil_kernels.ops.batched_gemm import batched_gemm_triton
    from cqil_kernels.ops.decode_attention import decode_attention_triton
    from cqil_kernels.ops.down_sum import down_sum_triton
    from cqil_kernels.ops.gate_up import gate_up_silu_triton
    from cqil_kernels.ops.qkv_gemm import qkv_gemm_triton
    from cqil_kernels.ops.qkv_rope_cache import qkv_rope_cache_triton

    bf = torch.bfloat16
    e = lambda *s: torch.empty(*s, dtype=bf)  # noqa: E731  (dry run: contents never read)
    each = lambda P, *s: [e(*s) for _ in range(P)]  # noqa: E731  (every layer its own tensor, as in a model)
    for name, c in shapes.items():
        H, nh, nkv, D, I, V = (c[k] for k in ("H", "nh", "nkv", "D", "I", "V"))
        for P in Ps:
            w_qkv = [w for _ in range(P) for w in (e(nh * D, H), e(nkv * D, H), e(nkv * D, H))]
            g = each(P, H)
            w_o, w_g, w_u, w_d = each(P, H, nh * D), each(P, I, H), each(P, I, H), each(P, H, I)
            for M in Ms:
                n = len(recorder.records)
                x = e(M, H)
                if M <= 16:  # decode: the engine's fused path
                    kc, vc = e(P, M, nkv, 64, D), e(P, M, nkv, 64, D)
                    qkv_rope_cache_triton(x, g, w_qkv, None, 1e-6, e(M, D), e(M, D), None, None, 0.0, kc, vc, 0,
                                          torch.zeros(1, dtype=torch.long), 1, nh)
                else:  # prefill: plain qkv GEMM
                    qkv_gemm_triton(x, g, w_qkv, None, 1e-6)
                a = batched_gemm_triton(e(M, P, nh * D).transpose(0, 1), w_o)
                m = gate_up_silu_triton(a, g, w_g, w_u, 1e-6, x, min(1, P - 1))
                down_sum_triton(m, w_d, x, a)
                for r in recorder.records[n:]:
                    r["tag"] = f"{name} M={M} P={P}"
            # decode attention over P*nh heads, 2112 slots (ctx 2048 + 64), batch 1 and 8
            for B in (1, 8):
                n = len(recorder.records)
                S = 2112
                kb, vb = e(P, B, nkv, S, D), e(P, B, nkv, S, D)
                decode_attention_triton(e(B, P * nh, D), list(kb.unbind(0)), list(vb.unbind(0)),
                                        torch.ones(B, S, dtype=torch.bool), S, D ** -0.5)
                for r in recorder.records[n:]:
                    r["tag"] = f"{name} B={B} P={P} S={S}"
        n = len(recorder.records)
        qkv_gemm_triton(e(1, H), [e(H)], [e(V, H)], None, 1e-6)  # final norm + lm_head
        for r in recorder.records[n:]:
            r["tag"] = f"{name} lm_head M=1"


def compile_records(records, arch: int = 90, ptxas_info: bool = True) -> list[dict]:
    """Compile recorded launches in a fresh process (interpreter off)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "launches.json")
        with open(path, "w") as f:
            json.dump(records, f)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = os.path.dirname(HERE)
        env["PYTHONPATH"] = os.pathsep.join([HERE, root, env.get("PYTHONPATH", "")])
        cmd = [sys.executable, os.path.join(HERE, "gpu_compile.py"), path, str(arch)] + (["--ptxas-info"] if ptxas_info else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"gpu_compile.py failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    from cqil_kernels.report import environment, write_json

    with as_on_gpu(), LaunchRecorder(dry=True) as rec:
        record_real_shapes(rec)
    records = rec.unique()
    results = compile_records(records, args.arch)
    print(f"{'shapes':28s} {'kernel':22s} {'warps':>5s} {'stages':>6s} {'regs':>4s} {'spill':>5s} {'smem KB':>7s}  flags")
    for r in results:
        if not r["ok"]:
            print(f"{r.get('tag') or '':28s} {r['name']}: COMPILE ERROR {r['error'][:200]}")
            continue
        flags = r["name"][len(r["kernel"]) + 1:-1]
        print(f"{r.get('tag') or '':28s} {r['kernel']:22s} {r['num_warps']:5d} {r['num_stages']:6d} "
              f"{r.get('registers') or 0:4d} {r.get('spill_store_bytes') or 0:5d} {r['shared'] / 1024:7.1f}  {flags}")
    if args.out:
        write_json({"environment": environment("cpu"), "target": f"sm_{args.arch} (compiled on the CPU, not run)",
                    "results": results}, args.out)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
