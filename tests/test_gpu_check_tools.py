"""The one-call GPU check's machinery, on the CPU: result lines, rotation sizing, failed checks as
rows, step timeouts, the GPU-only test selection. (The whole script's dry run is a CI step.)"""

import json
import math
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

pytest_plugins = ["pytester"]


def test_step_log_lines_survive_nan_and_a_torn_line(tmp_path):
    from step_log import StepLog, read_lines

    path = tmp_path / "r.jsonl"
    log = StepLog(path, "kernels")
    log.emit("ok", {"us": 1.5, "err": float("nan"), "shape": (1, 2)})
    log.emit("fail", {"error": "x"}, seconds=3.0)
    with open(path, "a") as f:
        f.write('{"step": "kernels", "sta')  # a process killed mid-write
    lines = read_lines(path)
    assert [ln["status"] for ln in lines] == ["ok", "fail"]
    assert lines[0]["payload"] == {"us": 1.5, "err": "nan", "shape": [1, 2]} and lines[1]["seconds"] == 3.0
    assert set(lines[0]) == {"step", "status", "seconds", "payload"} and log.counts == {"ok": 1, "fail": 1}


def test_rotation_covers_three_l2s():
    from bench_kernels import MAX_ROTATION_BYTES, copies_needed

    l2 = 60 * 10**6  # H200
    assert copies_needed(1_105_920, l2) == math.ceil(3 * l2 / 1_105_920)  # SmolLM2 qkv weights, P = 1
    assert copies_needed(33_554_432, l2) == 6                            # Llama-7B o_proj, P = 1
    assert copies_needed(721_420_288, l2) == 1                           # Llama-7B gate_up, P = 4: never in L2
    assert copies_needed(100, None) == 2                                 # CPU: no L2 figure
    assert copies_needed(MAX_ROTATION_BYTES // 2, 10**12) == 2            # capped


def test_failed_verify_and_failed_launch_are_rows_and_the_run_goes_on(monkeypatch):
    import bench_kernels as bk

    def bad_case(name):
        def build(c, P, M, rnd, norm, eb):
            def make():
                return dict(x=rnd(4, 4))

            def boom(d):
                raise RuntimeError("no kernel image")

            return bk.Case(name, M, P, 64, make, {"triton_fused": lambda d: d["x"] * 2, "other": boom},
                           lambda d: bk.verify(name, d["x"] * 2 + 1, lambda x: x * 2, (d["x"],)))
        return build

    monkeypatch.setattr(bk, "CASES", {"fake": bad_case("fake"), "fake2": bad_case("fake2")})
    seen = []
    ceiling = dict(read=dict(gbps=10.0), copy=dict(gbps=8.0), l2_bytes=None)
    rows = bk.run({"tiny": {}}, [1], [1], "cpu", True, emit=lambda s, r: seen.append((s, r)), ceiling=ceiling)
    kinds = [(r["op"], r["impl"], r["status"]) for r in rows]
    assert kinds == [("fake", "verify", "verify_failed"), ("fake", "triton_fused", "ok"), ("fake", "other", "error"),
                     ("fake2", "verify", "verify_failed"), ("fake2", "triton_fused", "ok"), ("fake2", "other", "error")]
    assert rows[1]["verified"] is False and rows[1]["read_ceiling_gbps"] == 10.0 and rows[1]["copies"] == 2
    assert "no kernel image" in rows[2]["error"]
    assert seen[0][1]["kind"] == "ceilings" and len(seen) == 1 + len(rows)


def test_a_step_past_its_timeout_is_killed_and_recorded(tmp_path):
    import gpu_check

    step = gpu_check.Step("slow", 1, 1, None)
    status, rc, secs = gpu_check.run_step(step, [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                          1.0, str(tmp_path / "log"), {})
    assert status == "timeout" and rc is None and secs < 30
    assert "started" in (tmp_path / "log").read_text()
    status, rc, _ = gpu_check.run_step(step, [sys.executable, "-c", "raise SystemExit(3)"], 10.0, str(tmp_path / "log"), {})
    assert (status, rc) == ("fail", 3)


def test_summary_names_failures_and_kernel_rows(tmp_path):
    import gpu_check
    from step_log import StepLog

    path = tmp_path / "results.jsonl"
    StepLog(path, "kernels").emit("ok", dict(model="Llama-7B", op="gate_up_silu", M=1, P=2, impl="triton_fused", us=120.0,
                                             GBps=3000.0, frac_of_read=0.75))
    StepLog(path, "gpu-tests").emit("fail", dict(kind="test", nodeid="tests/test_x.py::test_y", message="AssertionError: boom"))
    StepLog(path, "gpu-tests").emit("fail", dict(kind="step", statuses={"fail": 1}), 12.0)
    text = gpu_check.summarize(str(path))
    assert "FAIL gpu-tests: tests/test_x.py::test_y: AssertionError: boom" in text
    assert "gate_up_silu" in text and "fused 120.0 3000 75%" in text and "gpu-tests      fail" in text


def test_gpu_only_plugin_selects_and_logs(pytester, tmp_path, monkeypatch):
    pytester.makeconftest("""
import pytest

@pytest.fixture
def cuda_device():
    pytest.skip("no GPU here")
""")
    pytester.makepyfile(test_sel="""
import pytest

def test_cpu():
    pass

def test_gpu(cuda_device):
    pass

@pytest.mark.gpu
def test_marked():
    assert False, "runs"
""")
    jsonl = tmp_path / "t.jsonl"
    monkeypatch.setenv("PYTHONPATH", BENCH)
    monkeypatch.setenv("CQIL_JSONL", str(jsonl))
    monkeypatch.setenv("CQIL_STEP", "gpu-tests")
    monkeypatch.setenv("CQIL_GPU_ONLY", "1")
    result = pytester.runpytest_subprocess("-p", "pytest_gpu_only", "-p", "no:cacheprovider",
                                           "-W", "ignore::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(skipped=1, failed=1, deselected=1)
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert lines[0]["payload"] == {"kind": "selection", "selected": 2, "deselected": 1}
    assert sorted(ln["status"] for ln in lines[1:]) == ["fail", "skipped"]
    assert "runs" in next(ln for ln in lines if ln["status"] == "fail")["payload"]["message"]
    jsonl.unlink()
    monkeypatch.setenv("CQIL_GPU_ONLY", "exclude")
    result = pytester.runpytest_subprocess("-p", "pytest_gpu_only", "-p", "no:cacheprovider",
                                           "-W", "ignore::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=1, deselected=2)


@pytest.mark.parametrize("op", ["qkv_gemm", "down_sum", "decode_attention_static"])
def test_bench_cases_verify_on_the_cpu(op):
    """Each op's arguments as the benchmark builds them are what the op accepts (torch
    reference path here: no interpreter)."""
    import bench_kernels as bk

    case = next(bk.cases("tiny", bk.SMOKE_MODELS["tiny"], [2], [2], torch.float32, "cpu", ops=[op]))
    ok, err, budget = case.check(case.make())
    assert ok, (err, budget)
