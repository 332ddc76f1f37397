"""End-to-end decode latency: HF generate vs DecodeEngine without groups, P2 and P4 (issue 5).

    # GPU (H100): the full comparison, about 8 minutes (see NOTES.md, "End-to-end decode")
    python benchmarks/e2e_decode.py --out reports/e2e_decode_h100.json
    # CPU smoke (CI): tiny shapes, torch backend, < 60 s on 2 cores
    python benchmarks/e2e_decode.py --tiny --device cpu --out /tmp/e2e.json

Every measurement (bandwidth, each verification, each timed row, each prefill) is appended to
``--jsonl`` the moment it exists (``step_log.StepLog`` lines), so a run stopped by a timeout keeps
every finished row; the JSON of ``--out`` (with the cross-variant speedups) is written at the end.
A row that fails (out of memory, or any error) records its error and the run goes on.

Variants, all in ONE run on the same device and the same random weights:

- ``hf-eager``: ``model.generate`` with the default dynamic cache (what a user gets first).
- ``hf-static-compiled``: ``model.generate(..., cache_implementation="static")``. transformers 5.x
  auto-compiles the decode forward on CUDA when the cache is static (``torch.compile`` of
  ``model.__call__``, mode "reduce-overhead", i.e. CUDA graphs; prefill stays eager). This is the
  same call on 5.17 and 5.23, so no version-specific StaticCache code is needed; the row records
  whether the compiled call was really made (``model._compiled_call``). Each (batch, context) is
  compiled fresh (``torch._dynamo.reset()`` and the model's cache/compile attributes dropped
  between rows), so every row gets a shape-specialised graph and a cache of exactly prompt + new
  tokens: HF's best case. Skipped on CPU (transformers does not auto-compile there and compile
  time would dominate a smoke run).
- ``engine``: ``DecodeEngine`` on the unconverted model: the same kernels as P2/P4, one segment per
  layer (sequential), one CUDA graph per decode step on CUDA.
- ``engine-p2`` / ``engine-p4``: ``DecodeEngine`` on the model converted with ``paper_plan``.

Timing (style.md item 11): every measurement runs once untimed first (compile, JIT, graph capture,
cuBLAS handles) and is discarded; clocks are read only after ``torch.cuda.synchronize()``; the
median of ``--repeats`` runs is reported. Engine decode = N ``engine.step`` calls after a prefill,
each feeding back the argmax (what ``engine.generate`` does). HF decode = the time of
``generate(max_new_tokens=N+1)`` minus ``generate(max_new_tokens=1)`` (same prompt, same cache
length), divided by N: it keeps generate's own per-token work (logits processing, stopping
checks), which is part of that baseline. ms/token is per decode step (a step makes ``batch``
tokens), tokens/s = batch * 1000 / ms.

Bytes and floor: weight bytes = every parameter read once per decode step = all parameters except
the embedding table (a step gathers only ``batch`` rows of it) but including lm_head, counted even
when tied to the embedding (the lm_head GEMM reads the whole matrix). floor ms = weight bytes /
read bandwidth, the bandwidth measured in this run by a large ``x.sum()`` (CUDA events). The live
KV cache read per step is reported beside it (``kv_bytes``; floor_kv_ms includes it) and counted in
achieved GB/s.

Verification before timing (style.md item 12), per shape, batch 2 with one left-padded row:
greedy tokens of ``engine`` vs HF eager generate, and of ``engine-p2``/``engine-p4`` vs the torch
backend reference (``convert(..., backend="torch")`` + HF generate). The engine is also run teacher
forced on the reference tokens: at every position its argmax must equal the reference token, or
the two candidates must be a near-tie in both logit vectors (gap <= tie_rtol * max|logit|; tie_rtol
2^-5 in bf16/fp16, 1e-4 in fp32); the free-running engine tokens must equal the reference up to the
first such tie. A failed verification makes the script exit 1 (after writing the JSON).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

from cqil_kernels.latency import Clock  # wall clock that waits for the device (multi_gpu_model uses it too)
from cqil_kernels.launches import LaunchCounter
from cqil_kernels.report import environment, write_json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling modules below, when imported
from decode_models import SHAPES, TINY_SHAPES, build_model, kv_bytes, paper_plan, plan_name, weight_bytes  # noqa: E402
from decode_verify import tie_rtol, verify_engine  # noqa: E402
from ceilings import measure_read_bandwidth  # noqa: E402
from step_log import StepLog  # noqa: E402

VARIANTS = ("hf-eager", "hf-static-compiled", "engine", "engine-p2", "engine-p4")
ENGINE_PARALLEL = {"engine": 1, "engine-p2": 2, "engine-p4": 4}

# ---------------------------------------------------------------------------------------------- timing helpers



def free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def make_prompt(batch: int, length: int, vocab: int, device, pad_rows: dict | None = None, seed: int = 1):
    """Random prompt [batch, length] (ids >= 3) and its attention mask; ``pad_rows`` {row: n} left-pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in (pad_rows or {}).items():
        mask[row, :n] = 0
        ids[row, :n] = 0
    return ids.to(device), mask.to(device)


def hf_generate(model, ids, mask, new_tokens: int, static: bool, **extra):
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, **kw, **extra)


def reset_hf_compile(model) -> None:
    """Forget generate's static cache and compiled call, so the next row compiles for its own shape."""
    for attr in ("_cache", "_compiled_call", "_last_compile_config", "_previous_max_cache_length"):
        model.__dict__.pop(attr, None)
    try:
        torch._dynamo.reset()
    except Exception:  # pragma: no cover - older/other torch
        pass


def time_hf_decode(model, ids, mask, new_tokens: int, repeats: int, static: bool, clock: Clock) -> dict:
    """HF generate: ms per decode step = (t(N+1 tokens) - t(1 token)) / N; prefill ~ t(1 token)."""
    t0 = clock.now()
    hf_generate(model, ids, mask, new_tokens + 1, static)  # warm-up (compiles when static on CUDA)
    warm_s = clock.now() - t0
    if static:
        hf_generate(model, ids, mask, new_tokens + 1, static)  # cudagraph trees record on later calls
    graphs_before = _dynamo_graph_count()
    step_ms, prefill_ms = [], []
    for _ in range(repeats):
        t0 = clock.now()
        hf_generate(model, ids, mask, 1, static)
        t1 = clock.now()
        hf_generate(model, ids, mask, new_tokens + 1, static)
        t2 = clock.now()
        prefill_ms.append((t1 - t0) * 1e3)
        step_ms.append(((t2 - t1) - (t1 - t0)) * 1e3 / new_tokens)
    out = dict(ms_per_token=statistics.median(step_ms), ms_per_token_runs=step_ms,
               prefill_ms=statistics.median(prefill_ms), warmup_s=warm_s)
    if static:
        out["compiled"] = "_compiled_call" in model.__dict__
        after = _dynamo_graph_count()
        if graphs_before is not None and after is not None and after > graphs_before:
            out["note"] = f"torch.compile traced {after - graphs_before} new graph(s) during the timed runs"
    return out


def _dynamo_graph_count():
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # pragma: no cover - private API moved
        return None


@torch.inference_mode()
def time_engine_decode(engine, ids, mask, new_tokens: int, repeats: int, clock: Clock) -> dict:
    """Engine: prefill, then N ``step`` calls feeding back the argmax; ms per step."""
    logits = engine.prefill(ids, mask)
    tok = logits.argmax(-1)
    for _ in range(min(3, new_tokens)):  # warm-up: JIT, graph capture (first step), first replays
        tok = engine.step(tok).argmax(-1)
    # kernels one step launches (counted on an eager step; every timed run below starts with a prefill)
    with LaunchCounter() as launches:
        tok = engine.step(tok, cuda_graph=False).argmax(-1)
    step_ms, prefill_ms = [], []
    for _ in range(repeats):
        t0 = clock.now()
        tok = engine.prefill(ids, mask).argmax(-1)
        t1 = clock.now()
        for _ in range(new_tokens):
            tok = engine.step(tok).argmax(-1)
        t2 = clock.now()
        prefill_ms.append((t1 - t0) * 1e3)
        step_ms.append((t2 - t1) * 1e3 / new_tokens)
    ms = statistics.median(step_ms)
    return dict(ms_per_token=ms, ms_per_token_runs=step_ms, prefill_ms=statistics.median(prefill_ms),
                launches_per_step=launches.total, us_per_launch=ms * 1e3 / max(launches.total, 1),
                host_syncs_per_step=launches.syncs)


@torch.inference_mode()
def time_hf_prefill(model, ids, mask, repeats: int, clock: Clock) -> float:
    """HF eager forward of the prompt with a fresh dynamic cache, last-position logits only."""
    model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    runs = []
    for _ in range(repeats):
        t0 = clock.now()
        model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        runs.append((clock.now() - t0) * 1e3)
    return statistics.median(runs)


@torch.inference_mode()
def time_engine_prefill(engine, ids, mask, repeats: int, clock: Clock) -> float:
    engine.prefill(ids, mask)
    runs = []
    for _ in range(repeats):
        t0 = clock.now()
        engine.prefill(ids, mask)
        runs.append((clock.now() - t0) * 1e3)
    return statistics.median(runs)


def hf_reference(model, ids, mask, n: int):
    out = hf_generate(model, ids, mask, n, static=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(list(out.logits))


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and sizes: the CPU/CI smoke run")
    ap.add_argument("--shapes", nargs="+", default=None, help=f"from {list(SHAPES)} (or {list(TINY_SHAPES)} with --tiny)")
    ap.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 8 (tiny: 1 4)")
    ap.add_argument("--contexts", nargs="+", type=int, default=None, help="prompt lengths; default 256 2048 (tiny: 32 128)")
    ap.add_argument("--new-tokens", type=int, default=None, help="timed decode steps; default 64 (tiny: 16)")
    ap.add_argument("--prefill-lengths", nargs="*", type=int, default=None,
                    help="batch-1 prefill comparison lengths; default 128 512 2048 (tiny: 32 128); none to skip")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                    help="engine kernels: auto = Triton on CUDA, torch on CPU")
    ap.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto", help="engine decode CUDA graph (auto: on CUDA)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                    help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement, median reported (default 3, tiny 2)")
    ap.add_argument("--verify-tokens", type=int, default=None, help="greedy tokens compared before timing (default 16, tiny 8)")
    ap.add_argument("--no-verify", action="store_true", help="skip verification (not recommended)")
    ap.add_argument("--bandwidth-mb", type=int, default=None, help="size of the bandwidth tensor (default 4096 CUDA, 256 CPU)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="wall-clock budget: an hf-static-compiled row (compiled per row, 30-60 s on a GPU) that would "
                         "end past its shape's share of it is skipped, with the reason recorded")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: 1 with --tiny on CPU, where tiny GEMMs gain nothing from more "
                         "and a busy core makes multi-threaded runs stall; else torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="reports/e2e_decode.json")
    ap.add_argument("--jsonl", default=None, help="append every measurement to this JSONL file as soon as it is made")
    ap.add_argument("--step", default="e2e", help="step name of the JSONL lines")
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = TINY_SHAPES if args.tiny else SHAPES
    args.shapes = args.shapes or list(shapes)
    for s in args.shapes:
        if s not in shapes:
            ap.error(f"unknown shape {s!r}; choose from {list(shapes)}" + ("" if args.tiny else " (or use --tiny)"))
    args.batches = args.batches or ([1, 4] if args.tiny else [1, 8])
    args.contexts = args.contexts or ([32, 128] if args.tiny else [256, 2048])
    args.new_tokens = args.new_tokens or (16 if args.tiny else 64)
    if args.prefill_lengths is None:
        args.prefill_lengths = [32, 128] if args.tiny else [128, 512, 2048]
    args.repeats = args.repeats or (2 if args.tiny else 3)
    args.verify_tokens = args.verify_tokens or (8 if args.tiny else 16)
    if args.bandwidth_mb is None:
        args.bandwidth_mb = 4096 if str(args.device).startswith("cuda") else 256
    return args


def fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def print_table(rows, prefill, bandwidth) -> None:
    print(f"\nread bandwidth: {bandwidth['gbps']:.1f} GB/s ({bandwidth['method']}, {bandwidth['bytes'] / 2**20:.0f} MiB)")
    head = (f"{'shape':14s} {'B':>2s} {'ctx':>5s} {'variant':19s} {'plan':14s} {'steps':>5s} {'ms/tok':>8s} {'tok/s':>9s} "
            f"{'GB/s':>7s} {'floor':>7s} {'%floor':>6s} {'prefill':>8s} {'xA':>6s} {'xB':>6s} {'xC':>6s} {'launch':>6s} {'us/l':>5s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("skipped") or r.get("error") or "ms_per_token" not in r:
            why = r.get("skipped") or r.get("error") or "no result"
            print(f"{r['shape']:14s} {r['batch']:2d} {r['context']:5d} {r['variant']:19s} skipped: {why}")
            continue
        print(f"{r['shape']:14s} {r['batch']:2d} {r['context']:5d} {r['variant']:19s} {r['plan']:14s} {r['sequential_steps']:5d} "
              f"{r['ms_per_token']:8.3f} {r['tokens_per_s']:9.1f} {r['achieved_gbps']:7.1f} {r['floor_ms']:7.3f} "
              f"{r['pct_of_floor']:5.1f}% {r['prefill_ms']:8.2f} {fmt(r.get('speedup_vs_hf_eager')):>6s} "
              f"{fmt(r.get('speedup_vs_hf_static_compiled')):>6s} {fmt(r.get('speedup_vs_engine')):>6s} "
              f"{fmt(r.get('launches_per_step'), 'd'):>6s} {fmt(r.get('us_per_launch'), '.1f'):>5s}")
    print("xA/xB/xC: speedup vs hf-eager / hf-static-compiled / engine (no groups) at the same shape, batch, context")
    print("launch: kernels one engine step launches (LaunchCounter on an eager step); us/l: ms/token / launches")
    if prefill:
        print(f"\n{'shape':14s} {'tokens':>6s} {'variant':11s} {'prefill ms':>10s} {'vs hf-eager':>11s}")
        for p in prefill:
            ratio = p.get("ratio_vs_hf_eager")
            flag = "" if ratio is None or p["variant"] != "engine" else ("  ok (+-10%)" if abs(ratio - 1) <= 0.10 else "  OUTSIDE +-10%")
            print(f"{p['shape']:14s} {p['tokens']:6d} {p['variant']:11s} {p['ms']:10.2f} {fmt(ratio, '.3f'):>11s}{flag}")


def _error(e: BaseException) -> dict:
    """A row's record of a failure: OOM is expected at large shapes, anything else is a finding."""
    first = (str(e).splitlines() or [""])[0][:300]
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return dict(error=f"OOM: {first}")
    return dict(error=f"{type(e).__name__}: {first}")


def make_row(shape, cfg, b, c, variant, r, args, plans_of_shape, wbytes, elem, bw) -> dict:
    """One result row (no cross-variant speedups: those need the other rows, see finish_rows)."""
    L = cfg.num_hidden_layers
    P = ENGINE_PARALLEL.get(variant, 1)
    plan = plans_of_shape.get(variant)
    kvb = kv_bytes(cfg, b, c + args.new_tokens / 2, elem)
    floor_ms = wbytes / bw * 1e3
    row = dict(shape=shape, batch=b, context=c, new_tokens=args.new_tokens, variant=variant, plan=plan_name(L, P),
               sequential_steps=plan.num_sequential_steps(L) if plan is not None else L,
               weight_bytes=wbytes, kv_bytes=kvb, floor_ms=floor_ms, floor_kv_ms=(wbytes + kvb) / bw * 1e3, **r)
    if "ms_per_token" in r:
        ms = r["ms_per_token"]
        row.update(tokens_per_s=b * 1e3 / ms, achieved_gbps=(wbytes + kvb) / ms / 1e6, pct_of_floor=100.0 * floor_ms / ms)
    return row


def finish_rows(rows) -> None:
    """Add speedups vs hf-eager / hf-static-compiled / engine at the same shape, batch, context."""
    ms = {(r["shape"], r["batch"], r["context"], r["variant"]): r.get("ms_per_token") for r in rows}
    for r in rows:
        if "ms_per_token" not in r:
            continue
        for base, name in (("hf-eager", "speedup_vs_hf_eager"), ("hf-static-compiled", "speedup_vs_hf_static_compiled"),
                           ("engine", "speedup_vs_engine")):
            other = ms.get((r["shape"], r["batch"], r["context"], base))
            r[name] = None if other is None else other / r["ms_per_token"]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of cqil_kernels.ops
    import cqil_kernels as ck
    from cqil_kernels.backends import resolve_backend

    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    backend = resolve_backend(args.backend, device)
    cuda_graph = None if args.cuda_graph == "auto" else args.cuda_graph == "on"
    if args.threads is None and args.tiny and device.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = Clock(device)
    t_start = time.perf_counter()
    shapes = TINY_SHAPES if args.tiny else SHAPES
    log = StepLog(args.jsonl, args.step)  # every measurement is appended the moment it exists

    bandwidth = measure_read_bandwidth(device, args.bandwidth_mb * 2**20)
    bw = bandwidth["gbps"] * 1e9
    env = environment(str(device))
    log.emit("ok", dict(kind="bandwidth", environment=env, dtype=str(dtype).replace("torch.", ""), engine_backend=backend,
                        **bandwidth))
    print(f"device {env['device']}, dtype {str(dtype).replace('torch.', '')}, engine backend {backend}, "
          f"read bandwidth {bandwidth['gbps']:.1f} GB/s")

    rows, prefill, verification, plans = [], [], [], {}
    all_ok = True
    for si, shape in enumerate(args.shapes):
        # hf-static-compiled rows of shape si may start until this share of --budget-s is spent, so
        # that a slow compile of the first shape cannot take the later shapes' anchor rows
        deadline = args.budget_s * (si + 1) / len(args.shapes)
        model = build_model(shapes[shape], device, dtype, seed=args.seed)
        cfg = model.config
        L = cfg.num_hidden_layers
        wbytes = weight_bytes(model)
        elem = torch.finfo(dtype).bits // 8
        variant_plans = {v: paper_plan(L, ENGINE_PARALLEL[v]) for v in args.variants if v in ENGINE_PARALLEL}
        plans[shape] = {v: dict(name=plan_name(L, ENGINE_PARALLEL[v]), sequential_steps=p.num_sequential_steps(L), **p.to_dict())
                        for v, p in variant_plans.items()}
        print(f"\n== {shape}: {L} layers, weight bytes {wbytes / 1e6:.1f} MB, floor {wbytes / bw * 1e3:.3f} ms/token")

        def row_key_list():
            return [(b, c) for b in args.batches for c in args.contexts]

        def record(variant, b, c, r):
            row = make_row(shape, cfg, b, c, variant, r, args, variant_plans, wbytes, elem, bw)
            rows.append(row)
            status = "ok" if "ms_per_token" in r else ("skipped" if "skipped" in r else "error")
            log.emit(status, dict(kind="decode", **row))
            if "ms_per_token" in r:
                print(f"{shape} B={b} ctx={c} {variant}: {r['ms_per_token']:.3f} ms/token ({row['pct_of_floor']:.1f}% of floor)",
                      flush=True)
            else:
                print(f"{shape} B={b} ctx={c} {variant}: {r.get('skipped') or r.get('error')}", flush=True)

        prefill_hf = {}
        # ---------------- (a) HF eager
        if "hf-eager" in args.variants:
            for b, c in row_key_list():
                ids, mask = make_prompt(b, c, cfg.vocab_size, device)
                try:
                    r = time_hf_decode(model, ids, mask, args.new_tokens, args.repeats, False, clock)
                except Exception as e:  # noqa: BLE001 - a row, and the run goes on
                    r = _error(e)
                record("hf-eager", b, c, r)
                del ids, mask
                free_memory(device)
            for T in args.prefill_lengths:
                ids, mask = make_prompt(1, T, cfg.vocab_size, device)
                prefill_hf[T] = time_hf_prefill(model, ids, mask, max(5, args.repeats), clock)
                prefill.append(dict(shape=shape, tokens=T, batch=1, variant="hf-eager", ms=prefill_hf[T], ratio_vs_hf_eager=1.0))
                log.emit("ok", dict(kind="prefill", **prefill[-1]))
            free_memory(device)

        # ---------------- (c) (d) (e) engine without groups, P2, P4
        for variant, plan in variant_plans.items():
            P = ENGINE_PARALLEL[variant]
            ck.revert(model)
            if P > 1:
                ck.convert(model, plan, backend="torch")  # the torch backend is the HF-path reference
            if not args.no_verify:
                vb, vt = 2, 24 if args.tiny else 32
                ids, mask = make_prompt(vb, vt, cfg.vocab_size, device, pad_rows={1: 5}, seed=7)
                try:
                    ref_tok, ref_logits = hf_reference(model, ids, mask, args.verify_tokens)
                    eng = ck.DecodeEngine(model, max_batch_size=vb, max_length=vt + args.verify_tokens, backend=backend,
                                          cuda_graph=cuda_graph)
                    v = verify_engine(eng, ref_tok, ref_logits, ids, mask, tie_rtol(dtype))
                    v.update(engine_steps=eng.num_sequential_steps)
                    if eng.num_sequential_steps != plan.num_sequential_steps(L):
                        v["passed"] = False
                        v["failures"].append(dict(reason="engine segments != plan sequential steps"))
                    del eng, ref_tok, ref_logits
                except Exception as e:  # noqa: BLE001 - a failed verification, recorded
                    v = dict(passed=False, failures=[_error(e)], tokens_equal=False, near_ties=[], max_abs_logit_diff=float("nan"),
                             logit_scale=float("nan"))
                v.update(shape=shape, variant=variant, reference="hf-eager" if P == 1 else "convert(backend='torch') + hf-eager",
                         plan_steps=plan.num_sequential_steps(L))
                verification.append(v)
                log.emit("ok" if v["passed"] else "fail", dict(kind="verification", **v))
                all_ok &= v["passed"]
                status = "PASS" if v["passed"] else "FAIL"
                print(f"verify {variant:10s} vs {v['reference']}: {status} (tokens equal {v['tokens_equal']}, "
                      f"{len(v['near_ties'])} near-ties, max |dlogit| {v['max_abs_logit_diff']:.3g} of {v['logit_scale']:.3g})")
                del ids, mask
                free_memory(device)
            for b, c in row_key_list():
                ids, mask = make_prompt(b, c, cfg.vocab_size, device)
                eng = None
                try:
                    eng = ck.DecodeEngine(model, max_batch_size=b, max_length=c + args.new_tokens, backend=backend, cuda_graph=cuda_graph)
                    r = time_engine_decode(eng, ids, mask, args.new_tokens, args.repeats, clock)
                    r["engine_steps"] = eng.num_sequential_steps
                except Exception as e:  # noqa: BLE001
                    r = _error(e)
                record(variant, b, c, r)
                del eng, ids, mask
                free_memory(device)
            if args.prefill_lengths:
                eng = ck.DecodeEngine(model, max_batch_size=1, max_length=max(args.prefill_lengths) + 1, backend=backend, cuda_graph=cuda_graph)
                for T in args.prefill_lengths:
                    ids, mask = make_prompt(1, T, cfg.vocab_size, device)
                    ms = time_engine_prefill(eng, ids, mask, max(5, args.repeats), clock)
                    hf = prefill_hf.get(T)
                    prefill.append(dict(shape=shape, tokens=T, batch=1, variant=variant, ms=ms,
                                        ratio_vs_hf_eager=None if hf is None else ms / hf))
                    log.emit("ok", dict(kind="prefill", **prefill[-1]))
                del eng
                free_memory(device)
            ck.revert(model)

        # ---------------- (b) HF static cache + torch.compile (last: compile time is the budget risk)
        if "hf-static-compiled" in args.variants:
            last_compile = 0.0
            for b, c in row_key_list():
                if device.type != "cuda":
                    record("hf-static-compiled", b, c,
                           dict(skipped="CPU: transformers auto-compiles generate only on GPU; compile time would dominate"))
                    continue
                if time.perf_counter() - t_start + max(last_compile, 60.0) > deadline:
                    record("hf-static-compiled", b, c,
                           dict(skipped=f"time budget: --budget-s {args.budget_s:.0f} s, this shape's share ends at {deadline:.0f} s"))
                    continue
                ids, mask = make_prompt(b, c, cfg.vocab_size, device)
                reset_hf_compile(model)
                try:
                    r = time_hf_decode(model, ids, mask, args.new_tokens, args.repeats, True, clock)
                    last_compile = r["warmup_s"]
                    if not r.get("compiled"):
                        r["note"] = r.get("note", "") + "generate did not compile (no _compiled_call): this row is HF static cache, eager"
                except Exception as e:  # noqa: BLE001
                    r = _error(e)
                record("hf-static-compiled", b, c, r)
                del ids, mask
                reset_hf_compile(model)
                free_memory(device)
        del model
        free_memory(device)

    elapsed = time.perf_counter() - t_start
    order = {v: i for i, v in enumerate(VARIANTS)}
    rows.sort(key=lambda r: (args.shapes.index(r["shape"]), r["batch"], r["context"], order[r["variant"]]))
    finish_rows(rows)
    print_table(rows, prefill, bandwidth)
    payload = dict(environment=env, args=vars(args), dtype=str(dtype).replace("torch.", ""),
                   engine_backend=backend, bandwidth=bandwidth, plans=plans, verification=verification,
                   verification_passed=all_ok, rows=rows, prefill=prefill, elapsed_s=elapsed)
    write_json(payload, args.out)
    log.emit("done" if all_ok else "fail", dict(kind="summary", verification_passed=all_ok, rows=len(rows), elapsed_s=elapsed))
    print(f"\nverification {'passed' if all_ok else 'FAILED'}; {elapsed:.1f} s; wrote {args.out}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
