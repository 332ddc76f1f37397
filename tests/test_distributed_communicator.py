"""Communicator: engine choice (pure), one-process identity, gloo collectives equal to the math."""

import pytest
import torch

from cqil_kernels.distributed import Communicator, ReducePolicy, SymmetricSupport, choose_engine
from distributed_harness import run_ranks

OK = SymmetricSupport(True, "fake")
MiB = 1 << 20


# ---------------------------------------------------------------------------------- choice (pure)
def choose(numel, dtype=torch.bfloat16, world=2, support=OK, capacity=4 * MiB, **policy):
    return choose_engine(numel, dtype, world_size=world, support=support, capacity=capacity,
                         policy=ReducePolicy(**policy))


def test_small_messages_one_shot_large_two_shot():
    assert choose(4096).engine == "symm_one_shot"              # 8 KiB: decode, batch 1, H 4096
    assert choose(128 * 1024).engine == "symm_one_shot"        # exactly 256 KiB
    assert choose(128 * 1024 + 2).engine == "symm_two_shot"
    assert choose(512 * 4096).engine == "symm_two_shot"        # prefill 512 tokens
    assert choose(4096, one_shot_max_bytes=0).engine == "symm_two_shot"


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(support=None), "prepare() was not called"),
    (dict(support=SymmetricSupport(False, "no peer access")), "no peer access"),
    (dict(dtype=torch.float16), "float16 is not one of the symmetric-memory dtypes"),
    (dict(capacity=0), "no symmetric buffer prepared"),
    (dict(capacity=1000), "exceed the prepared buffer of 1000"),
])
def test_fallback_to_the_process_group_says_why(kwargs, fragment):
    numel = kwargs.pop("numel", 4096)
    choice = choose(numel, **kwargs)
    assert choice.engine == "process_group" and fragment in choice.reason


def test_unaligned_sizes_fall_back():
    assert choose(4097).engine == "process_group"                     # 8194 bytes of bf16
    assert choose(4097, dtype=torch.float32).engine == "symm_one_shot"  # fp32: always 4-byte multiples


def test_one_process_and_forced_policies():
    assert choose(4096, world=1).engine == "none"
    assert choose(4096, engine="process_group").engine == "process_group"
    assert choose(4096, engine="symm_two_shot").engine == "symm_two_shot"
    with pytest.raises(ValueError, match="forces 'symm_one_shot'.*float16"):
        choose(4096, dtype=torch.float16, engine="symm_one_shot")
    with pytest.raises(ValueError):
        ReducePolicy(engine="ring")
    with pytest.raises(ValueError):
        ReducePolicy(one_shot_max_bytes=-1)


# ---------------------------------------------------------------------------------- one process
def test_one_process_collectives_are_the_identity():
    comm = Communicator(None, "cpu")
    assert comm.trivial and comm.world_size == 1
    t = torch.randn(3, 5)
    ref = t.clone()
    assert comm.all_reduce_(t) is t and torch.equal(t, ref)
    assert comm.all_reduce_async_(t).wait() is t
    assert comm.all_gather(t) is t
    out = torch.empty_like(t)
    assert comm.all_gather(t, out=out) is out and torch.equal(out, t)
    with pytest.raises(ValueError, match="out must be"):
        comm.all_gather(t, out=torch.empty(4, 5))
    assert comm.prepare(1024, torch.bfloat16).engine == "none"
    assert comm.describe()["world_size"] == 1


def test_prepare_refuses_graph_capture(monkeypatch):
    import cqil_kernels.distributed.communicator as mod

    monkeypatch.setattr(mod, "_is_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="during CUDA-graph capture.*before capture"):
        Communicator(None, "cpu").prepare(1024, torch.float32)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="max_numel"):
        Communicator(None, "cpu").prepare(0, torch.float32)


# ---------------------------------------------------------------------------------- gloo, W ranks
def _collectives(ctx, seed):
    comm = Communicator.from_context(ctx)
    w, r = ctx.world_size, ctx.rank
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(4, 48, generator=gen) for _ in range(w)]  # every rank draws all ranks' inputs
    out = {}

    t = inputs[r].clone()
    comm.all_reduce_(t)
    out["fp32"] = t.tolist()
    assert comm.engine_for(t).engine == "process_group"

    b = inputs[r].to(torch.bfloat16)
    comm.all_reduce_(b)
    out["bf16"] = b.float().tolist()

    a, s = inputs[r].clone(), inputs[r].clone()
    handle = comm.all_reduce_async_(a)
    comm.all_reduce_(s)
    out["async_equals_sync"] = torch.equal(handle.wait(), s)

    # bypass: each rank's [P/W, M, H] attention outputs -> [P, M, H] in layer order
    local = inputs[r][None].repeat(2, 1, 1) * torch.tensor([1.0, 2.0])[:, None, None]
    g = comm.all_gather(local)
    static = torch.full((2 * w, 4, 48), float("nan"))
    gh = comm.all_gather_async(local, out=static)
    out["gather"] = g.tolist()
    out["gather_static_equal"] = gh.wait() is static and torch.equal(static, g)

    tok = torch.tensor([r * 10 + 1, r * 10 + 2])
    out["broadcast"] = comm.broadcast_(tok, src=0).tolist()
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_collectives_equal_the_one_process_math(world):
    seed = 7
    results = run_ranks(_collectives, world, seed)
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(4, 48, generator=gen) for _ in range(world)]
    expected = inputs[0].clone()
    for x in inputs[1:]:
        expected = expected + x
    for r, res in enumerate(results):
        got = torch.tensor(res["fp32"])
        if world == 2:  # a sum of two fp32 numbers has one rounding: bitwise
            assert torch.equal(got, inputs[0] + inputs[1])
        else:
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        assert res["fp32"] == results[0]["fp32"]   # every rank bitwise the same
        assert res["bf16"] == results[0]["bf16"]
        ref_bf16 = sum(x.to(torch.bfloat16).float() for x in inputs)
        torch.testing.assert_close(torch.tensor(res["bf16"]), ref_bf16, rtol=2e-2, atol=2e-2)
        assert res["async_equals_sync"] and res["gather_static_equal"]
        gathered = torch.tensor(res["gather"])
        assert gathered.shape == (2 * world, 4, 48)
        for q in range(world):
            assert torch.equal(gathered[2 * q], inputs[q]) and torch.equal(gathered[2 * q + 1], 2 * inputs[q])
        assert res["broadcast"] == [1, 2]


class FakeSymmetric:
    """Test double of SymmetricBuffers on the CPU: the 'kernels' are gloo all-reduces, calls recorded.

    ``available_on``: ranks whose probe says yes; ``fail_reserve_on``: ranks whose rendezvous fails.
    """

    def __init__(self, group, rank, available_on=(0, 1), fail_reserve_on=()):
        self.group, self.rank = group, rank
        self.available_on, self.fail_reserve_on = available_on, fail_reserve_on
        self.cap, self.calls = {}, []

    def support(self):
        return SymmetricSupport(self.rank in self.available_on, "fake" if self.rank in self.available_on else "no P2P here")

    def capacity(self, dtype):
        return self.cap.get(dtype, 0)

    def reserve(self, numel, dtype):
        self.calls.append(("reserve", numel, str(dtype)))
        if self.rank in self.fail_reserve_on:
            raise RuntimeError("fake rendezvous failure")
        self.cap[dtype] = max(numel, self.cap.get(dtype, 0))

    def _reduce(self, name, t):
        import torch.distributed as dist

        self.calls.append((name, t.numel()))
        dist.all_reduce(t, group=self.group)
        return t

    def one_shot_(self, t):
        return self._reduce("one_shot", t)

    def two_shot_(self, t):
        return self._reduce("two_shot", t)


def _symmetric_dispatch(ctx, available_on, fail_reserve_on):
    fake = FakeSymmetric(ctx.group, ctx.rank, available_on, fail_reserve_on)
    comm = Communicator.from_context(ctx, symmetric=fake)
    before = comm.engine_for(torch.zeros(8)).engine
    prepared = comm.prepare(128 * 1024, torch.float32).engine  # 512 KiB
    comm.prepare(1024, torch.float16)  # not a symmetric dtype: nothing reserved
    engines = {}
    for name, t in {"small": torch.ones(4096), "large": torch.ones(100_000), "too_big": torch.ones(128 * 1024 + 1),
                    "fp16": torch.ones(16, dtype=torch.float16)}.items():
        engines[name] = comm.engine_for(t).engine
        if name in ("small", "large"):
            h = comm.all_reduce_async_(t)
            assert torch.equal(h.wait(), torch.full_like(t, ctx.world_size))
        else:
            comm.all_reduce_(t)
            assert torch.equal(t, torch.full_like(t, ctx.world_size))
    return {"before": before, "prepared": prepared, "engines": engines, "calls": fake.calls,
            "describe": comm.describe()["symmetric_memory"]}


def test_symmetric_dispatch_by_size_dtype_and_capacity():
    res = run_ranks(_symmetric_dispatch, 2, (0, 1), ())
    for r in res:
        assert r["before"] == "process_group" and r["prepared"] == "symm_two_shot"
        assert r["engines"] == {"small": "symm_one_shot", "large": "symm_two_shot", "too_big": "process_group",
                                "fp16": "process_group"}
        assert r["calls"] == [("reserve", 131072, "torch.float32"), ("one_shot", 4096), ("two_shot", 100_000)]
        assert r["describe"]["available"] and r["describe"]["capacity"] == {"torch.float32": 131072}


@pytest.mark.parametrize("available_on, fail_reserve_on, reason", [
    ((0,), (), "unavailable on another rank"),
    ((0, 1), (1,), "registering symmetric buffers failed"),
])
def test_ranks_agree_to_fall_back_together(available_on, fail_reserve_on, reason):
    res = run_ranks(_symmetric_dispatch, 2, available_on, fail_reserve_on)
    for r, out in enumerate(res):
        assert out["prepared"] == "process_group"
        assert set(out["engines"].values()) == {"process_group"}
        assert not out["describe"]["available"]
        if r in available_on and not fail_reserve_on:
            assert reason in out["describe"]["reason"]
        # nobody ran a symmetric kernel; a reserve happened only where both agreed to try
        assert all(c[0] == "reserve" for c in out["calls"])
        assert bool(out["calls"]) == bool(fail_reserve_on)


def _bad_inputs(ctx):
    comm = Communicator.from_context(ctx)
    errors = []
    for call in (lambda: comm.all_reduce_(torch.ones(4, 4).t()), lambda: comm.all_reduce_([1.0]),
                 lambda: comm.all_gather(torch.tensor(1.0))):
        try:
            call()
        except (ValueError, TypeError) as e:
            errors.append(type(e).__name__ + ": " + str(e))
    comm.all_reduce_(torch.ones(2))  # the group still works after refused calls
    return errors


def test_bad_inputs_are_refused_before_any_communication():
    for errs in run_ranks(_bad_inputs, 2):
        assert len(errs) == 3
        assert "contiguous" in errs[0] and errs[1].startswith("TypeError") and "dimension" in errs[2]
