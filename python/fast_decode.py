"""Decode with the CQIL engine (static KV cache; one CUDA graph per decode step on a GPU).

    python python/fast_decode.py [--device cuda] [--tokens 64]

Uses only the public API. Compares ms/token of the engine on the sequential model and on the
paper's P2 plan, after checking that the converted engine's greedy tokens equal model.generate's.
"""

import argparse
import time

import torch

import cqil_kernels


def timed_generate(model, ids, tokens, device):
    # warm-up with the same length: builds the engine (sized for prompt + tokens) and captures the graph
    cqil_kernels.generate(model, ids, max_new_tokens=tokens)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = cqil_kernels.generate(model, ids, max_new_tokens=tokens)
    if device == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1e3 / tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, tokenizer = cqil_kernels.load_model(dtype=dtype, device=args.device)
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids.to(args.device)

    _, seq_ms = timed_generate(model, ids, args.tokens, args.device)
    cqil_kernels.convert(model, cqil_kernels.CQILPlan.contiguous(14, 30, 2))
    out, p2_ms = timed_generate(model, ids, args.tokens, args.device)
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens, do_sample=False)
    same = torch.equal(out, ref)
    print(f"{args.device}: sequential {seq_ms:.2f} ms/token, CQIL P2 {p2_ms:.2f} ms/token; "
          f"greedy tokens equal to model.generate: {same}")
    print(tokenizer.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
