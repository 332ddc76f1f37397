"""init / destroy: the torchrun environment, backend choice, timeout, one-process path."""

import datetime

import pytest

import cqil_kernels.distributed as cd
from cqil_kernels.distributed import LaunchEnv
from distributed_harness import run_ranks

FULL = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_no_launcher_variables_is_one_process():
    assert LaunchEnv.from_environ({}) is None
    assert LaunchEnv.from_environ({"PATH": "/bin", "RANK": ""}) is None


def test_full_environment_is_parsed():
    env = LaunchEnv.from_environ(FULL)
    assert env == LaunchEnv(rank=1, world_size=2, local_rank=1, master_addr="127.0.0.1", master_port=29500)
    no_local = dict(FULL)
    del no_local["LOCAL_RANK"]
    assert LaunchEnv.from_environ(no_local).local_rank == 1  # one node: LOCAL_RANK = RANK


@pytest.mark.parametrize("drop", ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"])
def test_half_set_environment_names_what_is_missing(drop):
    env = dict(FULL)
    del env[drop]
    with pytest.raises(ValueError, match=f"incomplete launcher environment.*{drop} missing"):
        LaunchEnv.from_environ(env)


def test_only_local_rank_set_is_incomplete():
    with pytest.raises(ValueError, match="LOCAL_RANK set but RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT missing"):
        LaunchEnv.from_environ({"LOCAL_RANK": "0"})


@pytest.mark.parametrize("key, value, fragment", [
    ("RANK", "one", "RANK='one' is not an integer"),
    ("RANK", "2", "RANK must be in 0..1"),
    ("WORLD_SIZE", "0", "WORLD_SIZE must be >= 1"),
    ("LOCAL_RANK", "-1", "LOCAL_RANK must be in 0..1"),
    ("MASTER_PORT", "70000", "MASTER_PORT must be a TCP port"),
])
def test_bad_values(key, value, fragment):
    env = dict(FULL, **{key: value})
    with pytest.raises(ValueError, match=fragment):
        LaunchEnv.from_environ(env)


@pytest.fixture
def no_launcher(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


def test_one_process_init_creates_no_group(no_launcher):
    import torch.distributed as dist

    with cd.init(device="cpu", timeout=datetime.timedelta(seconds=12)) as ctx:
        assert (ctx.rank, ctx.world_size, ctx.group, ctx.backend) == (0, 1, None, None)
        assert not ctx.distributed and ctx.is_main and ctx.timeout_s == 12.0
        assert not dist.is_initialized()
    cd.destroy(ctx)  # idempotent no-op


def test_init_errors(no_launcher, monkeypatch):
    with pytest.raises(ValueError, match="backend 'nccl' needs CUDA"):
        cd.init(backend="nccl", device="cpu")
    with pytest.raises(ValueError, match="backend must be"):
        cd.init(backend="mpi", device="cpu")
    for bad in (0, -3, "10", True):
        with pytest.raises(ValueError, match="timeout must be a positive"):
            cd.init(timeout=bad, device="cpu")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="incomplete launcher environment"):
        cd.init(device="cpu")


def _report(ctx):
    import torch.distributed as dist

    return {"rank": ctx.rank, "world": ctx.world_size, "local": ctx.local_rank, "backend": ctx.backend,
            "device": str(ctx.device), "timeout": ctx.timeout_s, "owns": ctx.owns_group,
            "pg_rank": dist.get_rank(ctx.group), "again": cd.init().owns_group}


def test_init_from_torchrun_environment_on_two_ranks():
    out = run_ranks(_report, 2, pg_timeout=7.0)
    for r, rep in enumerate(out):
        assert rep == {"rank": r, "world": 2, "local": r, "backend": "gloo", "device": "cpu", "timeout": 7.0,
                       "owns": True, "pg_rank": r, "again": False}
