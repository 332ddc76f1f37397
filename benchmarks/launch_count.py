"""Kernels launched by one decode step of the engine, per plan and backend (no GPU needed).

A small model's decode step inside a CUDA graph costs about (launches x per-kernel latency), so
this count is the lever for the SmolLM2-135M target (issue 5). On the CPU the Triton kernels run
through the interpreter with the launch heuristics sized for an H100 (132 SMs), so split-K makes
the same decisions, and so the same number of launches, as on the GPU.

    python benchmarks/launch_count.py --out /tmp/launches.json           # CPU, tiny shapes
    python benchmarks/launch_count.py --device cuda --shapes smollm2-135m llama-7b

Counting rules: ``cqil_kernels.launches.LaunchCounter`` (one kernel per working aten op, one per
Triton launch; custom-op internals are seen only through their Triton launches). On the CPU the
aten part is a count of torch ops run on the host, not of kernel launches: it is what those ops
would launch on a GPU if each were one kernel. The output says so.
"""

from __future__ import annotations

import argparse
import os
import sys



def _device_arg(argv) -> str:
    for i, a in enumerate(argv):
        if a == "--device":
            return argv[i + 1] if i + 1 < len(argv) else "cpu"
        if a.startswith("--device="):
            return a.split("=", 1)[1]
    return "cpu"


if _device_arg(sys.argv[1:]).startswith("cpu"):
    # the interpreter must be on before the kernels are decorated (first import of cqil_kernels.ops)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from decode_models import SHAPES, TINY_SHAPES, build_model, paper_plan, plan_name

import cqil_kernels
from cqil_kernels.engine import DecodeEngine
from cqil_kernels.launches import LaunchCounter
from cqil_kernels.launch_config import heuristic_config, use_launch_config
from cqil_kernels.report import environment, write_json

H100_SMS = 132

#: what the "launches" column is, said next to the numbers
COUNTING_NOTE = {
    "cpu": "'launches' = torch ops run on the host (one per working aten op, not kernel launches: none "
           "happen on the CPU) + interpreted Triton launches; an estimate of the GPU's kernels",
    "gpu": "'launches' = working aten ops (one kernel each assumed; cuBLAS split-K and multi-kernel ops "
           "not seen) + Triton launches",
}


def count_step(model, backend: str, batch: int, prompt: int, device) -> dict:
    """Launches of one eager decode step (after a prefill) of a fresh engine on ``model``."""
    engine = DecodeEngine(model, max_batch_size=batch, max_length=prompt + 4, backend=backend, cuda_graph=False)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        logits = engine.prefill(ids, mask)
        nxt = logits.argmax(-1)
        engine.step(nxt)  # first step outside the counter: one-time work (JIT, lazy buffers)
        with LaunchCounter() as count:
            engine.step(nxt)
    steps = engine.num_sequential_steps
    return {
        "segments": steps,
        "launches": count.total,
        "triton_launches": count.triton_launches(),
        "launches_per_segment": round(count.total / steps, 2),
        "host_syncs": count.syncs,
        "by_name": dict(count.by_name.most_common()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", nargs="+", default=None, help=f"default: tiny shapes on CPU, {list(SHAPES)} on CUDA")
    ap.add_argument("--backends", nargs="+", default=["triton", "torch"])
    ap.add_argument("--parallel", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--out", default=None, help="JSON report path")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    all_shapes = {**SHAPES, **TINY_SHAPES}
    shapes = args.shapes or (list(TINY_SHAPES) if device.type == "cpu" else list(SHAPES))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if device.type == "cpu":
        torch.set_num_threads(1)
    # on the CPU: the H100's launch decisions (132 SMs, GPU tiles), so the count is the GPU's
    with use_launch_config(heuristic_config("gpu", sm_count=H100_SMS) if device.type == "cpu" else None):
        rows = count_all(args, device, shapes, all_shapes, dtype)
    if args.out:
        counting = COUNTING_NOTE["cpu" if device.type == "cpu" else "gpu"]
        write_json({"environment": environment(device), "sm_count_assumed": H100_SMS if device.type == "cpu" else None,
                    "counting": counting, "batch": args.batch, "prompt": args.prompt, "rows": rows}, args.out)
    return 0


def count_all(args, device, shapes, all_shapes, dtype) -> list:
    rows = []
    counting = COUNTING_NOTE["cpu" if device.type == "cpu" else "gpu"]
    print(f"counting: {counting}")
    print(f"{'shape':<14} {'backend':<7} {'plan':<16} {'steps':>5} {'launches':>8} {'per step':>8} {'triton':>6} {'syncs':>5}")
    for shape in shapes:
        for backend in args.backends:
            for p in args.parallel:
                model = build_model(all_shapes[shape], device, dtype)
                L = model.config.num_hidden_layers
                if p > 1:
                    cqil_kernels.convert(model, paper_plan(L, p), backend=backend)
                r = count_step(model, backend, args.batch, args.prompt, device)
                r.update(shape=shape, backend=backend, plan=plan_name(L, p), parallel=p)
                rows.append(r)
                print(f"{shape:<14} {backend:<7} {r['plan']:<16} {r['segments']:>5} {r['launches']:>8} "
                      f"{r['launches_per_segment']:>8} {r['triton_launches']:>6} {r['host_syncs']:>5}")
                del model
    return rows


if __name__ == "__main__":
    sys.exit(main())
