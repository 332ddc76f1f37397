"""Tune the decode kernels on this GPU and write its launch-config file (``cqil_kernels.kernel_tuning``).

    # a real model shape, random weights are not even needed: only the shapes are used
    python benchmarks/tune_kernels.py --shape smollm2-135m --parallel 1 2 --out benchmarks/results/
    python benchmarks/tune_kernels.py --shape llama-7b --parallel 1 2 4 --quick --time-budget 240
    # the same through the CLI, for any model: python -m cqil_kernels tune --kernels --device cuda ...

Every candidate tile is checked against the torch reference, then timed inside a CUDA graph with
L2 flushed between calls (each call reads another copy of the weights; the copies exceed twice
the L2 size). The file (named after the device) holds the best tile per shape; copy it to
``cqil_kernels/launch_configs/`` (``--install``) and every launch on this device model uses it, or
pass it explicitly (``DecodeEngine(..., launch_config=path)``, ``tune --launch-config path``).

On a CPU this refuses with one line (exit 2): interpreter timings say nothing about GPU kernels.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # decode_models (shapes)


def main(argv=None) -> int:
    from decode_models import SHAPES, TINY_SHAPES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="smollm2-135m", choices=sorted({**SHAPES, **TINY_SHAPES}))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--parallel", type=int, nargs="+", default=[1, 2])
    p.add_argument("--context-length", type=int, default=1024, help="KV positions of the attention sweep")
    p.add_argument("--quick", action="store_true", help="a small candidate grid")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds; shapes after it keep the heuristics")
    p.add_argument("--out", default="benchmarks/results", help="folder for <device>.json")
    p.add_argument("--install", action="store_true", help="also copy it into cqil_kernels/launch_configs/")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import torch
    from transformers import LlamaConfig

    from cqil_kernels import kernel_tuning
    from cqil_kernels.loading import parse_dtype

    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print(f"error: kernel tuning needs a CUDA GPU (got --device {args.device}"
              f"{'' if device.type != 'cuda' else ', but CUDA is not available'}): Triton interpreter timings on a "
              "CPU say nothing about the GPU kernels", file=sys.stderr)
        return 2
    config = LlamaConfig(**{**SHAPES, **TINY_SHAPES}[args.shape])
    result = kernel_tuning.tune_kernels(config, device=device, dtype=parse_dtype(args.dtype),
                                        batch_sizes=args.batch_sizes, parallel=args.parallel,
                                        context_length=args.context_length, quick=args.quick,
                                        time_budget_s=args.time_budget, progress=not args.no_progress)
    print(result.table())
    paths = result.write(args.out, install=args.install)
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
