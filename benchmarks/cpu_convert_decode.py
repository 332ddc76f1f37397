"""Conversion time and decode ms/token of the torch backend vs the original model, on CPU.

    python benchmarks/cpu_convert_decode.py --out reports/cpu_convert_decode.json

Shapes: a tiny model and the SmolLM2-135M shape (random weights; 30 layers, hidden 576, 9 heads,
3 KV heads, MLP 1536). Plan: pairs from layer 14 to 30 (S14-E30 P2, 8 groups). Decode: batch 1,
greedy, dynamic cache, prompt of --prompt tokens, --steps timed steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cqil_kernels.report import environment, write_json  # noqa: E402

import cqil_kernels as ck  # noqa: E402

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=30, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
}


def build(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=2048, **SHAPES[shape])
    return LlamaForCausalLM(cfg).eval()


@torch.inference_mode()
def decode_ms_per_token(model, prompt: int, steps: int) -> float:
    from transformers import DynamicCache

    ids = torch.randint(3, model.config.vocab_size, (1, prompt))
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    out = model(input_ids=tok, past_key_values=cache, use_cache=True)  # warm-up step
    tok = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) * 1e3 / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="decode runs per variant; the median is reported")
    ap.add_argument("--out", default="reports/cpu_convert_decode.json")
    args = ap.parse_args(argv)

    plan = ck.CQILPlan.contiguous(14, 30, 2)
    rows = []
    for shape in args.shapes:
        model = build(shape)
        convert_s = []
        for _ in range(3):
            t0 = time.perf_counter()
            ck.convert(model, plan, backend="torch")
            convert_s.append(time.perf_counter() - t0)
            ck.revert(model)
        # interleave original and converted runs so that machine load affects both alike
        base_runs, conv_runs = [], []
        for _ in range(args.repeats):
            base_runs.append(decode_ms_per_token(model, args.prompt, args.steps))
            ck.convert(model, plan, backend="torch")
            conv_runs.append(decode_ms_per_token(model, args.prompt, args.steps))
            ck.revert(model)
        base, conv = statistics.median(base_runs), statistics.median(conv_runs)
        row = dict(shape=shape, plan=plan.to_dict(), convert_ms=statistics.median(convert_s) * 1e3,
                   decode_ms_per_token_original=base, decode_ms_per_token_cqil_torch=conv, ratio=conv / base)
        rows.append(row)
        print(f"{shape:14s} convert {row['convert_ms']:.1f} ms | decode original {base:.2f} ms/token, "
              f"CQIL P2 torch {conv:.2f} ms/token ({conv / base:.2f}x)")
    write_json({"environment": environment("cpu"), "prompt": args.prompt, "steps": args.steps, "rows": rows}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
