"""Faults and start-up checks: dead and hung ranks end the run inside the timeout; mismatched ranks
are refused by name; torchrun end to end."""

import json
import re
import os
import subprocess
import sys
import time

import pytest
import torch

import cqil_kernels.distributed as cd
from cqil_kernels import CQILPlan
from cqil_kernels.distributed.consistency import compare
from distributed_harness import run_ranks

PG_TIMEOUT = 5.0


def _killed(ctx):
    comm = cd.Communicator.from_context(ctx)
    comm.all_reduce_(torch.ones(4))  # both alive
    if ctx.rank == 1:
        os._exit(3)  # dies without a word, like a segfault or an OOM kill
    t0 = time.monotonic()
    try:
        comm.all_reduce_(torch.ones(4096))
    finally:
        print(f"rank 0 waited {time.monotonic() - t0:.2f} s", file=sys.stderr)


def test_a_killed_rank_ends_the_others_with_an_error():
    start = time.monotonic()
    out = run_ranks(_killed, 2, pg_timeout=PG_TIMEOUT, expect_failure=True)
    elapsed = time.monotonic() - start
    assert out[1].status == "exited" and out[1].exitcode == 3
    assert out[0].status == "error" and out[0].error_type == "DistributedError"
    assert "rank 0: all_reduce of 4096 torch.float32 elements failed" in out[0].message
    assert "a peer rank exited" in out[0].message or "did not answer" in out[0].message
    assert out[0].elapsed_s < PG_TIMEOUT + 5 and elapsed < PG_TIMEOUT + 15


def _hung(ctx):
    comm = cd.Communicator.from_context(ctx)
    comm.all_reduce_(torch.ones(4))
    if ctx.rank == 1:
        time.sleep(120)  # hangs (a deadlock, a stuck GPU): never reaches the next collective
    comm.all_reduce_(torch.ones(4))


def test_a_hung_rank_ends_the_others_at_the_timeout():
    start = time.monotonic()
    out = run_ranks(_hung, 2, pg_timeout=PG_TIMEOUT, expect_failure=True, grace=1.0)
    elapsed = time.monotonic() - start
    assert out[0].status == "error" and out[0].error_type == "DistributedError"
    assert f"did not answer within the process-group timeout of {PG_TIMEOUT:g} s" in out[0].message
    assert PG_TIMEOUT - 0.5 < out[0].elapsed_s < PG_TIMEOUT + 5
    assert out[1].status == "terminated"  # the harness (like torchrun) ends the hung one
    assert elapsed < PG_TIMEOUT + 15


def _barrier_with_a_late_rank(ctx):
    if ctx.rank == 2:
        time.sleep(60)
    cd.check_alive(ctx.group, timeout_s=2.0, rank=ctx.rank)


def test_liveness_barrier_names_the_missing_rank():
    out = run_ranks(_barrier_with_a_late_rank, 3, pg_timeout=PG_TIMEOUT, expect_failure=True, grace=1.0)
    assert out[0].status == "error" and out[0].error_type == "DistributedError"
    assert re.search(r"Ranks? 2 failed to pass monitoredBarrier", out[0].message)
    assert out[0].elapsed_s < 2.0 + 5


def _started_with(ctx, plans, seeds):
    torch.manual_seed(seeds[ctx.rank])
    lin = torch.nn.Linear(8, 8)
    fp = cd.fingerprint(plan=CQILPlan(plans[ctx.rank]), config={"hidden_size": 8},
                        named_tensors=lin.named_parameters(), world_size=ctx.world_size)
    cd.check_consistent(fp, ctx.group, ctx.rank, ctx.timeout_s)
    return fp


def test_ranks_with_the_same_start_pass():
    fps = run_ranks(_started_with, 2, [[[0, 1]], [[0, 1]]], [0, 0])
    assert fps[0] == fps[1] and set(fps[0]) == {"plan", "model_config", "weights", "world_size", "software"}


@pytest.mark.parametrize("plans, seeds, what", [
    ([[[0, 1]], [[2, 3]]], [0, 0], "plan differs (rank 0: "),
    ([[[0, 1]], [[0, 1]]], [0, 1], "weights differs (rank 0: "),
])
def test_ranks_started_differently_are_refused_on_every_rank(plans, seeds, what):
    out = run_ranks(_started_with, 2, plans, seeds, expect_failure=True)
    for o in out:
        assert o.status == "error" and o.error_type == "RankMismatchError"
        assert what in o.message and "rank 1: " in o.message
    if what.startswith("plan"):
        assert '"groups": [[2, 3]]' in out[0].message  # the plans themselves, not just hashes


def test_fingerprint_pieces_without_processes():
    lin = torch.nn.Linear(4, 3)
    base = cd.weight_fingerprint(lin.named_parameters())
    assert cd.weight_fingerprint(lin.named_parameters()) == base
    with torch.no_grad():
        lin.weight[1, 2] += 1e-7  # sampled element (of 12, all are sampled)
    assert cd.weight_fingerprint(lin.named_parameters()) != base
    assert cd.weight_fingerprint([(n, p.to(torch.bfloat16)) for n, p in lin.named_parameters()]) != base
    assert compare([{"a": "1", "b": "x"}, {"a": "1", "b": "x"}]) == []
    assert compare([{"a": "1"}, {"a": "2"}, {"a": "1"}]) == ["a differs (ranks 0,2: 1; rank 1: 2)"]
    assert compare([{"a": "1"}, {}]) == ["a differs (rank 0: 1; rank 1: (missing))"]

    class Config:  # the PretrainedConfig interface fingerprint uses (to_dict); transformers costs seconds to import
        def __init__(self, **kw):
            self.kw = kw

        def to_dict(self):
            return dict(self.kw)

    same = cd.consistency.config_fingerprint(Config(hidden_size=64, _name_or_path="/a", transformers_version="5.23.0"))
    assert same == cd.consistency.config_fingerprint({"hidden_size": 64, "_name_or_path": "/elsewhere/same-model"})
    assert same != cd.consistency.config_fingerprint(Config(hidden_size=32))
    cd.check_consistent({"x": "1"}, None)  # one process: nothing to compare


def test_torchrun_selftest_end_to_end():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "cqil_kernels.distributed.selftest", "--timeout", "10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    report = json.loads(lines[0])
    assert report["world_size"] == 2 and report["backend"] == "gloo" and report["all_ranks_passed"]
    assert all(report["checks"].values())


def test_guard_translates_backend_errors():
    with pytest.raises(cd.DistributedError, match=r"rank 3: all_reduce failed: a peer rank exited .*Connection closed"):
        with cd.collective_guard(lambda: "all_reduce", rank=3, timeout_s=5):
            raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1234")
    with pytest.raises(cd.DistributedError, match="timeout of 5 s"):
        with cd.collective_guard("x", timeout_s=5):
            raise RuntimeError("Timed out waiting 5000ms for recv operation to complete")
    with pytest.raises(KeyError):  # not a backend error: untouched
        with cd.collective_guard("x"):
            raise KeyError("k")


def test_wait_event_has_a_deadline():
    class Never:
        def query(self):
            return False

    class Done:
        def query(self):
            return True

    cd.wait_event(Done(), 0.01)
    t0 = time.monotonic()
    with pytest.raises(cd.DistributedError, match="did not complete within 0.2 s"):
        cd.wait_event(Never(), 0.2, "decode step")
    assert time.monotonic() - t0 < 2.0
