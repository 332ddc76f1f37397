"""LaunchConfig: the frozen object behind every launch decision, its files, and how launches find it.

What is checked: the heuristic tables and their lookup order; every bad value or file is refused
with a message naming the field (never reaching a kernel); a file written by the tuner round-trips
and, used for a launch, changes the decisions that LaunchCounter and the recorded launch
parameters show; a malformed or foreign-device file found automatically warns and falls back to
the heuristics; the engine runs its steps under its config. No timing here.
"""

from __future__ import annotations

import json
import os
import sys
import threading

import pytest
import torch

from cqil_kernels import launch_config as lc
from cqil_kernels.launch_config import (
    GemmTile,
    LaunchConfig,
    LaunchConfigError,
    TileRule,
    heuristic_config,
    launch_config_for,
    load_launch_config,
    save_launch_config,
    use_launch_config,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


# ---------------------------------------------------------------------------------------------- tables
def test_heuristic_tables_and_lookup_order():
    gpu = heuristic_config("gpu")
    assert gpu.gemm_tile("qkv_gemm", 1, 576, 576, 2) == GemmTile(16, 64, 128, 4, 4)
    assert gpu.gemm_tile("down_sum", 40, 576, 1536, 2) == GemmTile(64, 64, 64, 4, 4)
    assert gpu.gemm_tile("batched_gemm", 512, 576, 576, 2) == GemmTile(128, 128, 64, 8, 3)
    # gate_up_silu has its own rows (two accumulators: smaller N and decode K tiles)
    assert gpu.gemm_tile("gate_up_silu", 1, 1536, 576, 2) == GemmTile(16, 64, 64, 4, 4)
    assert gpu.gemm_tile("gate_up_silu", 512, 1536, 576, 2).BN == 64
    interp = heuristic_config("interpreter")
    assert interp.gemm_tile("gate_up_silu", 1, 9, 9, 1) == GemmTile(16, 32, 32, 4, 1)
    assert interp.attention.block_n == 32 and gpu.attention.block_n == 64
    # an exact-shape row wins over the op's class row, which wins over the "*" row
    exact = TileRule("qkv_gemm", "decode", GemmTile(16, 128, 256, 8, 5, split_k=3), shape=(576, 576, 2))
    tuned = gpu.with_rules([exact, TileRule("qkv_gemm", "decode", GemmTile(16, 32, 64, 2, 2))])
    assert tuned.gemm_tile("qkv_gemm", 1, 576, 576, 2) == exact.tile
    assert tuned.gemm_tile("qkv_gemm", 4, 576, 576, 3) == GemmTile(16, 32, 64, 2, 2)
    assert tuned.gemm_tile("down_sum", 1, 576, 1536, 2) == GemmTile(16, 64, 128, 4, 4)
    assert gpu.gemm_tile("qkv_gemm", 1, 576, 576, 2) == GemmTile(16, 64, 128, 4, 4)  # gpu itself unchanged


def test_configs_are_frozen_hashable_and_compare_by_decisions():
    a = heuristic_config("gpu", sm_count=132)
    b = heuristic_config("gpu").replace(sm_count=132)
    assert a == b and hash(a) == hash(b) and a.source != b.source  # the source is not a decision
    assert a != a.replace(splitk_mode="kernel")
    with pytest.raises(Exception):
        a.splitk_mode = "kernel"
    assert {a: 1}[b] == 1  # usable as a CUDA-graph cache key
    assert a.sm_count_for("cpu") == 132 and heuristic_config("gpu").sm_count_for("cpu") == 1


@pytest.mark.parametrize("changes, field", [
    (dict(splitk_mode="parallel"), "splitk_mode"),
    (dict(programs_per_sm=0), "programs_per_sm"),
    (dict(prefill_m=-1), "prefill_m"),
    (dict(sm_count=1.5), "sm_count"),
    (dict(max_split_k=1000), "max_split_k"),
    (dict(reduce_block=(16, 100)), "reduce_block"),
    (dict(poison_workspaces="yes"), "poison_workspaces"),
    (dict(colour="blue"), "unknown launch config fields"),
])
def test_bad_values_are_refused_naming_the_field(changes, field):
    with pytest.raises(LaunchConfigError, match=field):
        heuristic_config("gpu").replace(**changes)
    with pytest.raises(LaunchConfigError, match=field):
        with use_launch_config(**changes):
            pass


@pytest.mark.parametrize("tile, field", [
    (GemmTile(16, 64, 100), "BK"),
    (GemmTile(8, 64, 64), "BM"),
    (GemmTile(16, 64, 64, num_warps=3), "num_warps"),
    (GemmTile(16, 64, 64, num_stages=0), "num_stages"),
    (GemmTile(16, 64, 64, split_k=0), "split_k"),
])
def test_bad_tiles_are_refused(tile, field):
    with pytest.raises(LaunchConfigError, match=field):
        heuristic_config("gpu").with_rules([TileRule("down_sum", "decode", tile)])


def test_table_needs_a_fallback_row_per_class_and_no_duplicates():
    rows = heuristic_config("gpu").tiles
    with pytest.raises(LaunchConfigError, match="missing"):
        LaunchConfig(tiles=tuple(r for r in rows if r.op != "*" or r.shape_class != "mid"))
    with pytest.raises(LaunchConfigError, match="second row"):
        LaunchConfig(tiles=rows + rows[:1])
    with pytest.raises(LaunchConfigError, match="op"):
        TileRule("attention", "decode", GemmTile(16, 64, 64)).check()


# ---------------------------------------------------------------------------------------------- context
def test_use_launch_config_nests_merges_and_restores():
    base = launch_config_for("cpu")
    assert base == heuristic_config("interpreter")
    with use_launch_config(splitk_mode="kernel"):
        assert launch_config_for("cpu").splitk_mode == "kernel"
        with use_launch_config(sm_count=7):
            inner = launch_config_for("cpu")
            assert (inner.splitk_mode, inner.sm_count) == ("kernel", 7)
        with use_launch_config(heuristic_config("gpu", sm_count=132)):  # a config replaces what was current
            assert launch_config_for("cpu") == heuristic_config("gpu", sm_count=132)
        assert launch_config_for("cpu").sm_count is None
    assert launch_config_for("cpu") == base


def test_override_is_per_thread():
    seen = {}

    def other():
        seen["other"] = launch_config_for("cpu").splitk_mode

    with use_launch_config(splitk_mode="kernel"):
        t = threading.Thread(target=other)
        t.start()
        t.join()
        seen["here"] = launch_config_for("cpu").splitk_mode
    assert seen == {"other": "serial", "here": "kernel"}


# ---------------------------------------------------------------------------------------------- files
def _tuned(path, device_name="NVIDIA Test GPU"):
    cfg = heuristic_config("gpu").replace(splitk_mode="kernel", prefill_m=128).with_rules(
        [TileRule("down_sum", "decode", GemmTile(16, 32, 64, 2, 3, split_k=4), shape=(576, 1536, 2))])
    save_launch_config(cfg, path, device_name=device_name, tuning={"rows": [{"us": 1.0}]})
    return cfg


def test_file_round_trip(tmp_path):
    path = tmp_path / "cfg.json"
    cfg = _tuned(path)
    data = json.loads(path.read_text())
    assert data["device"] == "NVIDIA Test GPU" and {"torch", "triton", "cuda"} <= set(data["versions"])
    loaded = load_launch_config(path)
    assert loaded == cfg and "NVIDIA Test GPU" in loaded.source
    # a partial file: the missing fields and rows are the GPU heuristics'
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"format": lc.FORMAT, "version": 1, "device": "x",
                                   "config": {"splitk_mode": "kernel"}}))
    assert load_launch_config(partial) == heuristic_config("gpu").replace(splitk_mode="kernel")


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"device": "x"}), "not a launch config"),
    (json.dumps({"format": lc.FORMAT, "version": 99, "device": "x"}), "format version"),
    (json.dumps({"format": lc.FORMAT, "version": 1}), "which device"),
    (json.dumps({"format": lc.FORMAT, "version": 1, "device": "x", "config": {"tiles": [
        {"op": "down_sum", "shape_class": "decode", "BM": 16, "BN": 64, "BK": 96}]}}), r"tiles\[0\]\.BK"),
    (json.dumps({"format": lc.FORMAT, "version": 1, "device": "x", "config": {"tiles": [
        {"op": "down_sum", "shape_class": "huge", "BM": 16, "BN": 64, "BK": 64}]}}), "shape_class"),
    (json.dumps({"format": lc.FORMAT, "version": 1, "device": "x", "config": {"split_mode": "kernel"}}),
     "unknown keys"),
    (json.dumps({"format": lc.FORMAT, "version": 1, "device": "x", "config": {"attention": {"block_n": 48}}}),
     "attention.block_n"),
])
def test_malformed_files_give_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(LaunchConfigError, match=match) as info:
        load_launch_config(path)
    assert str(path) in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(LaunchConfigError, match="cannot read"):
        load_launch_config(tmp_path / "nope.json")


def test_foreign_device_file_is_refused_when_explicit(tmp_path, monkeypatch):
    path = tmp_path / "cfg.json"
    _tuned(path, "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(lc, "_device_name", lambda device: "NVIDIA H200")
    with pytest.raises(LaunchConfigError, match="tuned on 'NVIDIA H100 80GB HBM3', not on this 'NVIDIA H200'"):
        load_launch_config(path, "cuda:0")
    assert load_launch_config(path, "cuda:0", check_device=False).splitk_mode == "kernel"


def test_discovered_files_are_used_and_bad_ones_warn_and_fall_back(tmp_path, monkeypatch):
    """The package data folder is searched by device name; a malformed or foreign file found there
    gives a warning and the heuristics (no GPU needed: the device name is faked)."""
    monkeypatch.setattr(lc, "config_dir", lambda: tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Test GPU")
    dev = torch.device("cuda", 0)
    assert lc._discover(dev) == heuristic_config("gpu")  # no file
    good = _tuned(tmp_path / lc.device_file_name("NVIDIA Test GPU"))
    assert (tmp_path / "NVIDIA_Test_GPU.json").is_file()
    assert lc._discover(dev) == good
    (tmp_path / "NVIDIA_Test_GPU.json").write_text('{"format": "cqil_kernels.launch_config", "version": 1}')
    with pytest.warns(UserWarning, match="heuristics"):
        assert lc._discover(dev) == heuristic_config("gpu")
    _tuned(tmp_path / "NVIDIA_Test_GPU.json", device_name="NVIDIA Other GPU")
    with pytest.warns(UserWarning, match="tuned on 'NVIDIA Other GPU'"):
        assert lc._discover(dev) == heuristic_config("gpu")


def test_use_launch_config_takes_a_path(tmp_path):
    path = tmp_path / "cfg.json"
    cfg = _tuned(path)
    with use_launch_config(path):
        assert launch_config_for("cpu") == cfg
    with pytest.raises(LaunchConfigError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        with use_launch_config(tmp_path / "bad.json"):
            pass


# ---------------------------------------------------------------------------------------------- launches
def _down_sum_args(device, H=200, I=260, P=2):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(P, 1, I, generator=g).to(device)
    w = [(torch.randn(H, I, generator=g) * 0.05).to(device) for _ in range(P)]
    res = torch.randn(1, H, generator=g).to(device)
    return m, w, res


def _triton_launches(count) -> dict:
    return {k: n for k, n in count.by_name.items() if k.startswith("triton::")}


@pytest.mark.interpreter
def test_a_config_file_changes_the_recorded_launch_decisions(device, tmp_path, monkeypatch):
    """The same call, without and with a tuned file: LaunchCounter sees the separate reduction
    the file asks for, the recorded launch has the file's tile and split count, and the result is
    the same sum."""
    pytest.importorskip("triton")
    from gpu_compile import LaunchRecorder

    from cqil_kernels.launches import LaunchCounter
    from cqil_kernels.ops.down_sum import down_sum_triton

    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    m, w, res = _down_sum_args(device)
    as_gpu = heuristic_config("gpu", sm_count=132)
    with use_launch_config(as_gpu), LaunchRecorder() as rec, LaunchCounter() as count:
        want = down_sum_triton(m, w, res)
    (default,) = [r for r in rec.records if r["name"] == "_down_sum_kernel"]
    assert _triton_launches(count) == {"triton::_down_sum_kernel": 1}  # serial split-K: one launch
    assert (default["kwargs"]["BN"]["value"], default["kwargs"]["BK"]["value"]) == (64, 128)

    path = tmp_path / "tuned.json"
    rule = TileRule("down_sum", "decode", GemmTile(16, 32, 64, 2, 3, split_k=3), shape=(200, 260, 2))
    save_launch_config(as_gpu.replace(splitk_mode="kernel").with_rules([rule]), path, device_name="NVIDIA Test GPU")
    with use_launch_config(path), LaunchRecorder() as rec, LaunchCounter() as count:
        got = down_sum_triton(m, w, res)
    assert _triton_launches(count) == {"triton::_down_sum_kernel": 1, "triton::_splitk_reduce_kernel": 1}
    launch = next(r for r in rec.records if r["name"] == "_down_sum_kernel")
    kw = launch["kwargs"]
    assert (kw["BM"]["value"], kw["BN"]["value"], kw["BK"]["value"]) == (16, 32, 64)
    assert launch["options"] == {"num_warps": 2, "num_stages": 3}
    assert kw["SERIAL"]["value"] is False and kw["SPLIT"]["value"] is True
    # K = 2 layers x ceil(260 / 64) = 10 blocks, asked for 3 splits: 3 splits of 4 blocks
    from cqil_kernels.ops.down_sum import _down_sum_kernel

    args = dict(zip(_down_sum_kernel.arg_names, launch["args"]))
    assert (args["SPLITS"]["value"], args["KB_PER_SPLIT"]["value"]) == (3, 4), args
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.interpreter
def test_engine_steps_run_under_its_config(device, tmp_path, monkeypatch):
    """An engine given a config runs prefill and decode under it (here: "kernel" split-K with the
    H100's decisions, so its step launches reductions); the same engine without one does not."""
    import cqil_kernels as ck
    from cqil_kernels.launches import LaunchCounter
    from tiny_models import make_tiny

    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = make_tiny("llama", num_layers=2, hidden_size=200, intermediate_size=260).to(device)
    cfg = heuristic_config("gpu", sm_count=132).replace(splitk_mode="kernel")
    counts = {}
    for name, config in (("own", cfg), ("default", None)):
        engine = ck.DecodeEngine(model, max_batch_size=1, max_length=16, backend="triton", cuda_graph=False,
                                 launch_config=config)
        ids = torch.randint(1, 90, (1, 5), device=device)
        tok = engine.prefill(ids, torch.ones_like(ids)).argmax(-1)
        with LaunchCounter() as c:
            engine.step(tok)
        counts[name] = c.by_name["triton::_splitk_reduce_kernel"]
        assert engine.effective_launch_config() == (cfg if config else launch_config_for(device))
    assert counts["own"] >= 2 and counts["default"] == 0
    # a path works too, and is checked when the engine is built
    path = tmp_path / "cfg.json"
    save_launch_config(cfg, path, device_name="NVIDIA Test GPU")
    engine = ck.DecodeEngine(model, max_batch_size=1, max_length=16, backend="torch", launch_config=path)
    assert engine.launch_config == cfg
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(LaunchConfigError, match="not a launch config"):
        ck.DecodeEngine(model, max_batch_size=1, max_length=16, backend="torch", launch_config=tmp_path / "bad.json")


def test_engine_keys_graphs_on_batch_and_config(cuda_device):
    """On a GPU, a step under another config captures its own graph; the first is replayed again
    under the first config (never a graph captured under other decisions)."""
    import cqil_kernels as ck
    from tiny_models import make_tiny

    model = make_tiny("llama", num_layers=2, hidden_size=200, intermediate_size=260).to(cuda_device)
    engine = ck.DecodeEngine(model, max_batch_size=1, max_length=16, backend="triton")
    ids = torch.randint(1, 90, (1, 5), device=cuda_device)
    tok = engine.prefill(ids, torch.ones_like(ids)).argmax(-1)
    engine.step(tok)
    engine.step(tok)
    with use_launch_config(splitk_mode="kernel"):
        engine.step(tok)
    keys = list(engine._graphs)
    assert len(keys) == 2 and {k[0] for k in keys} == {1}
    assert {k[1].splitk_mode for k in keys} == {"serial", "kernel"}
