"""The op-set interface: every backend implements it, is chosen once by name, copies and pickles
as its name; the compiled decode attention (``+csrc``: its C++ twin on the CPU) is a selectable
implementation that gives the same tokens."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import cqil_kernels as ck
import cqil_kernels.ops  # noqa: F401  decorate the kernels now, while conftest's TRITON_INTERPRET=1 is set
from cqil_kernels import compiled
from cqil_kernels.backends import BACKENDS, OpSet, get_ops, parse_backend, resolve_backend
from tiny_models import make_tiny

INTERFACE = ("qkv_gemm", "qkv_rope_cache", "batched_gemm", "gate_up_silu", "down_sum", "rms_norm",
             "decode_attention", "cached_decode_attention", "prepare")


@pytest.fixture(autouse=True)
def _torch_ops_on_cpu(monkeypatch, request):
    # the torch op sets must not depend on the interpreter (conftest switches it on)
    if request.config.getoption("--device") == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")


def _needs_csrc():
    if not compiled.available():
        pytest.skip(f"cqil_kernels._C not built ({compiled.load_error()})")


@pytest.mark.parametrize("name", [b for b in BACKENDS if b != "auto"])
def test_every_backend_is_an_op_set_with_the_whole_interface(name):
    ops = get_ops(name)
    assert isinstance(ops, OpSet) and ops.name == name
    for method in INTERFACE:
        assert callable(getattr(ops, method)), method
    assert get_ops(name) is ops  # chosen once: one instance per name
    assert copy.deepcopy(ops) is ops and pickle.loads(pickle.dumps(ops)) is ops
    assert parse_backend(name)[1] == ("csrc" if name.endswith("+csrc") else "default")


def test_interface_is_enforced():
    class Partial(OpSet):
        def qkv_gemm(self, *a):
            return None

    with pytest.raises(TypeError, match="abstract"):
        Partial("partial")


@pytest.mark.parametrize("bad", ["cuda", "triton+flash", "+csrc", "torch+"])
def test_unknown_backends_are_refused(bad):
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend(bad, "cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        get_ops(bad)
    with pytest.raises(ValueError, match="resolve_backend"):
        get_ops("auto")


def test_csrc_without_the_compiled_module_is_refused(monkeypatch):
    monkeypatch.setattr(compiled, "available", lambda: False)
    with pytest.raises(ValueError, match="cqil_kernels._C"):
        resolve_backend("torch+csrc", "cpu")


def test_torch_op_set_falls_back_to_the_models_attention_in_hf_form():
    ops = get_ops("torch")
    q = torch.randn(1, 4, 1, 8)
    keys = [torch.randn(1, 2, 5, 8)] * 2
    assert ops.decode_attention(q, keys, keys, None, None, 0.3) is None


def test_csrc_cached_attention_matches_the_reference():
    _needs_csrc()
    from cqil_kernels.ops import decode_attention_reference

    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 3, 2, 2, 40, 16, generator=g)  # K/V, P, B, nkv, S, D
    q = torch.randn(2, 3 * 4, 16, generator=g)
    mask = torch.rand(2, 40, generator=g) > 0.3
    mask[:, 0] = True
    for name in ("torch+csrc", "triton+csrc"):
        if name.startswith("triton"):
            pytest.importorskip("triton")
        got = get_ops(name).cached_decode_attention(q, list(kv[0]), list(kv[1]), mask, 33, 0.25)
        want = decode_attention_reference(q, list(kv[0]), list(kv[1]), mask, 33, 0.25)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the HF-mask form reads an additive mask and runs the same kernel
    hf_mask = torch.where(mask[:, None, None, :], 0.0, float("-inf"))
    got = get_ops("torch+csrc").decode_attention(q[:, :, None], list(kv[0]), list(kv[1]), hf_mask, None, 0.25)
    torch.testing.assert_close(got, decode_attention_reference(q, list(kv[0]), list(kv[1]), mask, 40, 0.25),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="float32"):
        get_ops("torch+csrc").cached_decode_attention(q.half(), [k.half() for k in kv[0]], [v.half() for v in kv[1]],
                                                      mask, 33, 0.25)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_engine_and_group_with_the_compiled_attention_give_the_same_tokens(family):
    """The engine's cached attention and the group's HF-form attention both run through the op
    set; with the compiled kernel (C++ twin here) the tokens equal the torch op set's."""
    _needs_csrc()
    model = make_tiny(family)
    ck.convert(model, ck.CQILPlan.contiguous(1, 5, 2), backend="torch")
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    want = ck.DecodeEngine(model, max_batch_size=2, max_length=20, backend="torch").generate(ids, max_new_tokens=6)
    engine = ck.DecodeEngine(model, max_batch_size=2, max_length=20, backend="torch+csrc")
    assert engine.ops is get_ops("torch+csrc")
    assert torch.equal(engine.generate(ids, max_new_tokens=6), want)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, **kw)
        ck.revert(model)
        ck.convert(model, ck.CQILPlan.contiguous(1, 5, 2), backend="torch+csrc")
        got = model.generate(input_ids=ids, **kw)
    assert torch.equal(got, ref)
    assert copy.deepcopy(model).model.layers[1]._cqil_group.backend == "torch+csrc"
