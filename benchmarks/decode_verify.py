"""Verification of a DecodeEngine against reference greedy tokens and logits, before any timing.

Teacher forced on the reference tokens, the engine's argmax must match at every position or be a
near-tie in both logit vectors; free running, it must reproduce the reference up to the first
near-tie (see e2e_decode.py's docstring).
"""

from __future__ import annotations

import torch

def tie_rtol(dtype) -> float:
    # bf16/fp16: 8 ulps of bf16 at the logit scale (2^-5) covers the rounding differences of a
    # differently fused (but same-math) forward through 30-32 layers; fp32: 1e-4.
    return 2.0 ** -5 if dtype in (torch.bfloat16, torch.float16) else 1e-4


@torch.inference_mode()
def verify_engine(engine, ref_tokens, ref_logits, ids, mask, rtol: float) -> dict:
    """Compare the engine with reference greedy tokens [B, n] and their logits [n, B, V].

    Teacher forced: prefill, then step on the reference tokens; at every position the engine's
    argmax must be the reference token or a near-tie in both logit vectors. Free running:
    ``engine.generate`` must reproduce the reference up to the first near-tie.
    """
    B, n = ref_tokens.shape
    eng = [engine.prefill(ids, mask).float().clone()]
    for t in range(1, n):
        eng.append(engine.step(ref_tokens[:, t - 1]).float().clone())
    eng = torch.stack(eng)  # [n, B, V]
    ref = ref_logits.float()
    arg = eng.argmax(-1).T  # [B, n]
    ties, bad, first_tie = [], [], [n] * B
    for b in range(B):
        for t in range(n):
            r, e = int(ref_tokens[b, t]), int(arg[b, t])
            if r == e:
                continue
            scale = float(ref[t, b].abs().max())
            gap_ref = float(ref[t, b, r] - ref[t, b, e])
            gap_eng = float(eng[t, b, e] - eng[t, b, r])
            tol = rtol * scale
            entry = dict(row=b, pos=t, ref_token=r, engine_token=e, gap_ref=gap_ref, gap_engine=gap_eng, tol=tol)
            (ties if max(gap_ref, gap_eng) <= tol else bad).append(entry)
            first_tie[b] = min(first_tie[b], t)
    free = engine.generate(ids, mask, max_new_tokens=n)[:, ids.shape[1]:]
    free_equal = bool(torch.equal(free.cpu(), ref_tokens.cpu()))
    prefix_ok = all(torch.equal(free[b, : first_tie[b] + 1 if first_tie[b] < n else n].cpu(),
                                arg[b, : first_tie[b] + 1 if first_tie[b] < n else n].cpu()) for b in range(B))
    prefix_ok = prefix_ok and all(torch.equal(free[b, : first_tie[b]].cpu(), ref_tokens[b, : first_tie[b]].cpu()) for b in range(B))
    return dict(
        passed=not bad and prefix_ok,
        tokens_equal=free_equal,
        compared_tokens=int(B * n),
        near_ties=ties,
        failures=bad,
        free_run_prefix_ok=prefix_ok,
        max_abs_logit_diff=float((eng - ref).abs().max()),
        logit_scale=float(ref.abs().max()),
    )
