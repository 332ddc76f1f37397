"""tune: candidate plans, quality measured once per plan, latency labelled by device, the Pareto set,
the recommendation within the budget, the files; the kernel sweep's candidates and file on the CPU.

Behaviour only - no timing assertions (the latencies of a shared CPU say nothing here).
"""

from __future__ import annotations

import argparse
import importlib
import json
import random

import pytest
import torch

import cqil_kernels as ck
import cqil_kernels.ops  # noqa: F401  decorate the kernels now, while conftest's TRITON_INTERPRET=1 is set
from cqil_kernels import tuning as tn
from cqil_kernels.texts import TokenWindows
from tiny_models import make_tiny

FAST = dict(context_lengths=(6,), prompt_len=5, decode_steps=2, repeats=2, progress=False)


@pytest.fixture(autouse=True)
def _torch_ops_on_cpu(monkeypatch, request):
    # latency runs the torch op set on the CPU; keep it off the interpreter (conftest turns it on)
    if request.config.getoption("--device") == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")


def _windows(n=2, T=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TokenWindows(torch.randint(3, 97, (n, T), generator=g), torch.ones(n, dtype=torch.long), T, "random")


def _row(name, ms, ppl, kl=None):
    return {"name": name, "quality": {"ppl_increase": ppl, "kl": ppl if kl is None else kl, "top1_agreement": 1.0},
            "latency": {"decode": {"B1 ctx6": {"median_ms": ms}}}}


# ---------------------------------------------------------------------------------------------- selection
def test_pareto_front_has_no_dominated_plan_and_keeps_every_undominated_one():
    rng = random.Random(0)
    for trial in range(50):
        rows = [_row(f"p{i}", rng.choice([1.0, 2.0, 3.0, 4.0]) + rng.random() * (trial % 2),
                     rng.choice([0.0, 0.05, 0.1, 0.2])) for i in range(8)]
        front = set(tn.pareto_front(rows, "B1 ctx6", "ppl"))
        lat = {r["name"]: r["latency"]["decode"]["B1 ctx6"]["median_ms"] for r in rows}
        q = {r["name"]: r["quality"]["ppl_increase"] for r in rows}

        def dominates(a, b):
            return lat[a] <= lat[b] and q[a] <= q[b] and (lat[a] < lat[b] or q[a] < q[b])

        for name in lat:
            dominated = any(dominates(o, name) for o in lat if o != name)
            assert (name in front) == (not dominated), (trial, name)


def test_recommendation_is_the_fastest_within_the_budget():
    rows = [_row("no groups", 10.0, 0.0), _row("a", 8.0, 0.04), _row("b", 6.0, 0.09), _row("c", 5.0, 0.2),
            _row("d", 6.0, 0.05)]
    assert tn.recommend(rows, "B1 ctx6", "ppl", 0.10)["name"] == "d"  # tie on latency: the better quality
    assert tn.recommend(rows, "B1 ctx6", "ppl", 0.045)["name"] == "a"
    assert tn.recommend(rows, "B1 ctx6", "ppl", 0.0)["name"] == "no groups"
    assert tn.recommend(rows, "B1 ctx6", "ppl", 1.0)["name"] == "c"
    for budget in (0.0, 0.03, 0.06, 0.1, 0.5):
        rec = tn.recommend(rows, "B1 ctx6", "ppl", budget)
        assert rec["quality"]["ppl_increase"] <= budget
        assert all(r["latency"]["decode"]["B1 ctx6"]["median_ms"] >= rec["latency"]["decode"]["B1 ctx6"]["median_ms"]
                   for r in rows if r["quality"]["ppl_increase"] <= budget)
        assert rec["name"] in tn.pareto_front(rows, "B1 ctx6", "ppl")
    with pytest.raises(ValueError, match=">= 0"):
        tn.recommend(rows, "B1 ctx6", "ppl", -0.1)
    with pytest.raises(ValueError, match="budget metric"):
        tn.recommend(rows, "B1 ctx6", "loss", 0.1)


def test_plan_key_and_paper_plans():
    assert tn.plan_key(ck.CQILPlan.sequential()) == tn.plan_key(None) == tn.plan_key(ck.CQILPlan([[3]], bypass=0))
    assert tn.plan_key(ck.CQILPlan([[1, 2]], bypass=1)) != tn.plan_key(ck.CQILPlan([[1, 2]], bypass=0))
    assert tn.paper_plan(32, 2).plan == ck.CQILPlan.contiguous(12, 30, 2)
    assert tn.paper_plan(30, 4).name == "paper S14-E30 P4"
    assert tn.paper_plan(2, 4) is None


# ---------------------------------------------------------------------------------------------- quality
def test_quality_is_measured_once_per_plan_and_search_is_reused(monkeypatch):
    """Every plan search measured is reused; tune measures only the rest (paper and given plans),
    each once, in one compare_plans run; a second tune with the same cache measures nothing."""
    evaluate = importlib.import_module("cqil_kernels.evaluate")  # the package exports a function of that name

    model = make_tiny("llama", num_layers=6)
    windows = _windows()
    measured = []
    original = evaluate.compare_plans

    def counting(model_, windows_, plans, **kw):
        measured.append([tn.plan_key(p) for p in plans])
        return original(model_, windows_, plans, **kw)

    monkeypatch.setattr(evaluate, "compare_plans", counting)  # the cache's measurements (search has its own)
    cache = tn.QualityCache(windows.to_dict())
    given = ck.CQILPlan([[0, 1], [2, 3]], bypass=1)  # search runs at bypass 0: never measured there
    res = tn.tune(model, windows, parallel=(2,), max_groups=2, plans=[given], quality=cache,
                  search_kwargs=dict(beam=2, contiguous_top=1), **FAST)
    names = [r["name"] for r in res.rows]
    assert names[0] == "no groups"
    assert any(n.startswith("search P2 N1") for n in names) and any(n.startswith("search P2 N2") for n in names)
    assert len(measured) == 1  # one run for everything search did not measure
    keys = measured[0]
    assert len(keys) == len(set(keys)) and tn.plan_key(given) in keys
    by_key = {tn.plan_key(ck.CQILPlan.from_dict(r["plan"])): r for r in res.rows}
    for k in keys:
        assert by_key[k]["quality"]["source"] == "measured by tune"
    for r in res.rows:
        if r["name"].startswith("search"):
            assert r["quality"]["source"].startswith("search")
    assert res.settings["quality_measured_by_tune"] == len(keys)
    # the same candidates again: nothing left to measure
    measured.clear()
    tn.tune(model, windows, candidates=[tn.Candidate(r["name"], ck.CQILPlan.from_dict(r["plan"]), r["source"])
                                        for r in res.rows], quality=cache, **FAST)
    assert measured == []
    assert ck.get_plan(model) is None  # the model is left as it was


def test_tune_without_quality_or_windows_is_a_clear_error():
    model = make_tiny("llama", num_layers=4)
    with pytest.raises(ValueError, match="no measured quality"):
        tn.tune(model, None, candidates=[tn.Candidate("x", ck.CQILPlan([[1, 2]]), "given")], **FAST)


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget_ppl=0.1, budget_kl=0.1), "one quality budget"),
    (dict(budget_ppl=-1.0), ">= 0"),
    (dict(world_size=1), "world_size"),
    (dict(batch_sizes=(0,)), "batch_sizes"),
    (dict(context_lengths=()), "context_lengths"),
    (dict(repeats=0), "repeats"),
    (dict(plans=[ck.CQILPlan([[5, 6]])]), "out of range"),
])
def test_bad_inputs_give_clear_errors(kwargs, match):
    model = make_tiny("llama", num_layers=4)
    args = dict(FAST, run_search=False, include_paper=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        tn.tune(model, _windows(), **args)


# ---------------------------------------------------------------------------------------------- the result
def test_tune_end_to_end_writes_a_labelled_table_json_png_and_plan(tmp_path):
    model = make_tiny("qwen2", num_layers=6)
    windows = _windows()
    res = tn.tune(model, windows, parallel=(2,), run_search=False, plans=[ck.CQILPlan([[1, 2, 3]])], budget_kl=1.0,
                  batch_sizes=(1, 2), context_lengths=(6, 9), world_size=2,
                  **{k: v for k, v in FAST.items() if k != "context_lengths"})
    assert [r["name"] for r in res.rows] == ["no groups", "paper S2-E6 P2", "plan 1: 1-3"]
    assert res.budget_metric == "kl" and res.latency_key == "B1 ctx6"
    rec = res.recommended
    assert rec["quality"]["kl"] <= 1.0 and rec["pareto"]
    assert all(set(r["latency"]["decode"]) == {"B1 ctx6", "B2 ctx6", "B1 ctx9", "B2 ctx9"} for r in res.rows)
    assert all(set(r["latency"]["prefill"]) == {"B1 T5", "B2 T5"} for r in res.rows)
    for r in res.rows:
        st = r["latency"]["decode"]["B1 ctx6"]
        assert st["repeats"] == 2 and st["min_ms"] <= st["median_ms"] <= st["max_ms"]
        groups = ck.CQILPlan.from_dict(r["plan"]).parallel_groups
        if any(len(g) % 2 for g in groups):
            assert r["modeled_ms"] is None  # a group of 3 cannot be split over 2 devices
        else:
            assert r["modeled_ms"] > 0
    assert set(res.segment_costs["c_ms"]) >= {"1"}
    table = res.table()
    assert "CPU latencies, not GPU numbers" in table and "MEASURED on CPU" in table
    assert "MODELED" in table and "<- recommended" in table
    paths = res.write(tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["environment"]["device"].startswith("CPU") and "CPU latencies" in data["latency_measured_on"]
    assert data["recommendation"]["name"] == rec["name"] and data["pareto"] == res.pareto
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert ck.CQILPlan.from_json(paths["plan"]) == ck.CQILPlan.from_dict(rec["plan"])


def test_main_job_table_reuses_the_search_and_measures_no_quality(monkeypatch, tmp_path, capsys):
    """The main job's closing table: the plans its search measured, timed; compare_plans is never
    called for it."""
    evaluate = importlib.import_module("cqil_kernels.evaluate")  # the package exports a function of that name
    from cqil_kernels.main_job import main_tuning_table

    model = make_tiny("llama", num_layers=6)
    result = ck.search(model, _windows(), parallel=2, groups=2, beam=2, contiguous_top=1, progress=False)

    def refuse(*a, **k):
        raise AssertionError("the main job's table must not re-measure quality")

    monkeypatch.setattr(evaluate, "compare_plans", refuse)
    args = argparse.Namespace(no_tune=False, tune_budget_ppl=0.5, tune_context=6, tune_steps=2, tune_repeats=2,
                              backend="torch", no_progress=True)
    paths = main_tuning_table(args, model, result, tmp_path)
    printed = capsys.readouterr().out
    assert "no groups" in printed and "search P2 N2" in printed and "CPU latencies" in printed
    data = json.loads(paths["json"].read_text())
    names = [r["name"] for r in data["rows"]]
    assert names[0] == "no groups" and any(n.startswith("search P2 N1") for n in names)
    assert any("search P2 N2" in n for n in names)
    assert data["recommendation"]["quality"]["ppl_increase"] <= 0.5
    assert (tmp_path / "tune_plan.json").is_file()
    args.no_tune = True
    assert main_tuning_table(args, model, result, tmp_path) is None


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_tune_and_its_errors(tmp_path, capsys):
    from cqil_kernels.cli import main
    from test_loading import save_tiny_model

    tiny = tmp_path / "tiny"
    save_tiny_model(tiny, num_layers=6)
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man.\n\n" * 40, encoding="utf-8")
    plan = tmp_path / "mine.json"
    ck.CQILPlan([[0, 1], [2, 3]]).to_json(plan)
    out = tmp_path / "tune"
    common = ["--model", tiny, "--text", text, "--seq-len", 16, "--max-windows", 2, "--no-progress"]
    argv = ["tune", *common, "--parallel", "2", "--max-groups", 1, "--beam", 1, "--plans", plan, "--context-lengths", 6,
            "--prompt-len", 4, "--decode-steps", 2, "--repeats", 2, "--budget-ppl", 0.5, "--out", out]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "file mine" in printed and "recommended" in printed
    assert {p.name for p in out.iterdir()} >= {"tune.json", "tune.png", "plan.json"}
    bad = [
        (["--budget-ppl", 0.1, "--budget-kl", 0.1], "one quality budget"),
        (["--world-size", 1], "--world-size must be >= 2"),
        (["--launch-config", tmp_path / "none.json"], "launch config not found"),
        (["--plans", tmp_path / "none.json"], "plan file not found"),
        (["--kernels"], "needs a CUDA GPU"),
    ]
    for extra, message in bad:
        assert main([str(a) for a in ["tune", *common, "--no-search", *extra]]) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # after the loader's own log lines
        assert last.startswith("error: ") and message in last and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------- kernel sweep (CPU parts)
def test_kernel_sweep_candidates_and_config_file(tmp_path):
    from cqil_kernels import kernel_tuning as kt
    from cqil_kernels.launch_config import LaunchConfigError, heuristic_config, load_launch_config, shape_class

    cfg = make_tiny("llama").config
    shapes = kt.model_gemm_shapes(cfg, batch_sizes=(1, 4), parallel=(1, 2))
    labels = [s.label for s in shapes]
    assert len(labels) == len(set(labels)) == 2 * (4 * 2 + 1)
    qkv = next(s for s in shapes if s.op == "qkv_gemm" and s.P == 2 and s.M == 1)
    assert qkv.parts == (48, 24, 24) and qkv.N == 96 and qkv.K == 48
    head = next(s for s in shapes if s.N == cfg.vocab_size)
    assert head.P == 1 and head.parts == (97,)

    big = kt.GemmShape("gate_up_silu", 1, 11008, 4096, 2)
    tiles = kt.gemm_candidates(big)
    assert tiles and len(set(tiles)) == len(tiles)
    assert all(t.BM == 16 and t.BN * t.BK <= 64 * 128 for t in tiles)
    assert all(kt.shared_memory_bytes(big, t, 2) <= kt.H100_SMEM for t in tiles)
    assert len(kt.gemm_candidates(big, quick=True)) < len(tiles)
    small = kt.GemmShape("down_sum", 1, 48, 88, 2)
    assert all(t.BN <= 64 and t.BK <= 128 for t in kt.gemm_candidates(small))  # no tile far wider than the GEMM
    prefill = kt.GemmShape("batched_gemm", 512, 4096, 4096, 2)
    assert {t.BM for t in kt.gemm_candidates(prefill)} == {64, 128}

    base = heuristic_config("gpu")
    t0 = base.gemm_tile(big.op, big.M, *big.key)
    s0 = kt.policy_split(big, t0, base, 132)
    splits = kt.split_candidates(big, t0, base, 132)
    assert s0 in splits and 1 in splits and splits == sorted(set(splits)) and max(splits) <= 64
    assert kt.weight_copies(10 << 20, 50 << 20) * (10 << 20) >= 2 * (50 << 20)
    assert kt.weight_copies(4 << 30, 50 << 20) == 2
    with pytest.raises(ValueError):
        kt.weight_copies(0, 1)

    best = {big: tiles[0], small: kt.gemm_candidates(small)[0]}
    tuned = kt.build_config(best, base, splitk_mode="kernel", attention=base.attention)
    assert tuned.gemm_tile(big.op, 1, *big.key) == tiles[0]
    assert tuned.gemm_tile(big.op, 1, 4096, 4096, 2) == base.gemm_tile(big.op, 1, 4096, 4096, 2)  # other shapes
    assert tuned.splitk_mode == "kernel"
    result = kt.KernelTuneResult(device_name="NVIDIA Test GPU", dtype="bfloat16", config=tuned, rows=[
        {"shape": big.label, "heuristic_us": 20.0, "best_us": 15.0, "best_gbps": 1000.0, "best_tile": "t",
         "candidates_timed": 3}])
    assert "MEASURED on NVIDIA Test GPU" in result.table()
    paths = result.write(tmp_path)
    assert paths["config"].name == "NVIDIA_Test_GPU.json"
    loaded = load_launch_config(paths["config"])
    assert loaded == tuned and shape_class(1) == "decode"
    assert json.loads(paths["config"].read_text())["tuning"]["rows"][0]["best_us"] == 15.0
    paths["config"].write_text(paths["config"].read_text().replace('"BK": 64', '"BK": 65', 1))
    with pytest.raises(LaunchConfigError, match="BK"):
        load_launch_config(paths["config"])


def test_kernel_tuning_refuses_the_cpu():
    from cqil_kernels import kernel_tuning as kt

    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        kt.tune_kernels(make_tiny("llama").config, device="cpu")
