"""Tests of the compiled part (csrc/, cqil_kernels._C, cqil_kernels.compiled).

(a) the C++ CPU implementation of the split-KV decode attention against a torch reference
    (skipped when _C is not built); (b) a CMake configure + build into a temp dir (skipped without
    cmake, a C++ compiler or pybind11; also compiles the .cu where nvcc is found); (c) the CUDA op
    against torch in fp16/bf16 (needs --device cuda, a GPU and a CUDA build).
Nothing here probes CUDA or loads _C at import time.
"""

import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import poison_

from cqil_kernels import compiled

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cmod():
    module = compiled.load()
    if module is None:
        pytest.skip(f"cqil_kernels._C not built ({compiled.load_error()}); see csrc/README.md")
    return module


def make_case(B, P, nh, nkv, S, D, holes, *, dtype=torch.float32, device="cpu", seed=0):
    """q [B, P*nh, D]; K and V buffers [P, B, nkv, S, D]; mask [B, S] bool with random holes."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, P * nh, D, generator=g)
    kbuf = torch.randn(P, B, nkv, S, D, generator=g)
    vbuf = torch.randn(P, B, nkv, S, D, generator=g)
    mask = None
    if holes:
        mask = torch.rand(B, S, generator=g) > 0.3
        mask[:, 0] = True  # at least one key per row; fully masked rows have their own test
    to = dict(dtype=dtype, device=device)
    return q.to(**to), kbuf.to(**to), vbuf.to(**to), None if mask is None else mask.to(device)


def assert_within_torch_error(out, q, kcs, vcs, mask, kv_len, scale, factor=2.0, slack=1e-6):
    """|kernel - fp64 ref| <= factor * |torch at q's precision - fp64 ref| + slack (abs max)."""
    ref64 = compiled.decode_attention_reference(
        q.double(), [c.double() for c in kcs], [c.double() for c in vcs], mask, kv_len, scale,
        compute_dtype=torch.float64,
    )
    ref_lp = compiled.decode_attention_reference(q, kcs, vcs, mask, kv_len, scale,
                                                 compute_dtype=q.dtype)
    assert out.shape == ref64.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "kernel left NaN/inf in the output"
    err = (out.double() - ref64).abs().max().item()
    err_torch = (ref_lp.double() - ref64).abs().max().item()
    assert err <= factor * err_torch + slack, f"kernel error {err:.3g} vs torch {err_torch:.3g}"


def run_cpu_raw(cmod, q, kbuf, vbuf, mask, kv_len, scale, num_splits, out=None):
    """Calls _C.decode_attention_cpu with data_ptr()s of [P, B, nkv, S, D] buffers."""
    P, B, nkv, S, D = kbuf.shape
    nh = q.shape[1] // P
    out = poison_(torch.empty(B, P * nh, D)) if out is None else out
    ws = poison_(torch.empty(cmod.workspace_floats(B, P * nh, D, num_splits)))
    p = cmod.DecodeAttnParams()
    p.q, p.q_stride_b, p.q_stride_h = q.data_ptr(), q.stride(0), q.stride(1)
    p.k, p.k_stride_layer = kbuf.data_ptr(), kbuf.stride(0)
    p.k_stride_b, p.k_stride_h, p.k_stride_s = kbuf.stride(1), kbuf.stride(2), kbuf.stride(3)
    p.v, p.v_stride_layer = vbuf.data_ptr(), vbuf.stride(0)
    p.v_stride_b, p.v_stride_h, p.v_stride_s = vbuf.stride(1), vbuf.stride(2), vbuf.stride(3)
    if mask is not None:
        p.kv_mask, p.mask_stride_b, p.mask_stride_s = mask.data_ptr(), *mask.stride()
    p.out, p.out_stride_b, p.out_stride_h = out.data_ptr(), out.stride(0), out.stride(1)
    p.workspace = ws.data_ptr()
    p.batch, p.num_layers, p.num_heads, p.num_kv_heads = B, P, nh, nkv
    p.seq_len, p.head_dim, p.kv_len, p.num_splits = S, D, kv_len, num_splits
    p.scale, p.dtype = scale, cmod.DTYPE_FLOAT32
    cmod.decode_attention_cpu(p)
    return out


# (B, P, nh, nkv, S, D, kv_len, num_splits): odd sizes, GQA/MQA/MHA, kv_len < S,
# more splits than keys (empty splits), D = 1 and 256.
CPU_CASES = [
    (1, 1, 1, 1, 1, 1, 1, 1),
    (2, 2, 4, 2, 37, 64, 37, 3),
    (3, 3, 6, 2, 50, 17, 29, 4),
    (2, 3, 9, 3, 65, 128, 64, 7),
    (1, 2, 4, 4, 10, 32, 10, 16),
    (2, 1, 8, 1, 33, 256, 33, 5),
    (1, 3, 3, 1, 129, 80, 100, 2),
]


# ------------------------------------------------------------------------------------------
# (a) CPU implementation


@pytest.mark.parametrize("holes", [False, True], ids=["nomask", "holes"])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "x".join(map(str, c)))
def test_cpu_matches_torch(cmod, case, holes):
    B, P, nh, nkv, S, D, kv_len, splits = case
    q, kbuf, vbuf, mask = make_case(B, P, nh, nkv, S, D, holes, seed=sum(case))
    scale = 1.0 / math.sqrt(D)
    out = run_cpu_raw(cmod, q, kbuf, vbuf, mask, kv_len, scale, splits)
    assert_within_torch_error(out, q, list(kbuf), list(vbuf), mask, kv_len, scale)


def test_cpu_split_count_does_not_change_result(cmod):
    q, kbuf, vbuf, mask = make_case(2, 2, 4, 2, 97, 64, True, seed=1)
    outs = [run_cpu_raw(cmod, q, kbuf, vbuf, mask, 90, 0.125, s) for s in (1, 2, 5, 13, 90, 200)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)


def test_cpu_rows_without_keys_are_zero(cmod):
    q, kbuf, vbuf, mask = make_case(3, 2, 2, 1, 12, 16, True, seed=2)
    mask[1] = False  # sequence 1 attends to nothing
    out = run_cpu_raw(cmod, q, kbuf, vbuf, mask, 12, 0.25, 3)
    assert (out[1] == 0).all()
    ref = compiled.decode_attention_reference(q, list(kbuf), list(vbuf), mask, 12, 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    empty = run_cpu_raw(cmod, q, kbuf, vbuf, None, 0, 0.25, 4)  # kv_len == 0
    assert (empty == 0).all()


def test_cpu_strided_q_out_and_mask(cmod):
    """Non-contiguous q/out rows and a mask with a non-unit position stride."""
    B, P, nh, nkv, S, D = 2, 2, 4, 2, 21, 32
    q_big, kbuf, vbuf, _ = make_case(B, P, nh, nkv, S, 2 * D, False, seed=3)
    q = q_big[..., :D]  # row stride 2*D
    kbuf, vbuf = kbuf[..., :D], vbuf[..., :D]  # seq stride 2*D
    mask = (torch.arange(2 * S) % 3 != 1).repeat(B, 1)[:, ::2]  # stride 2
    out_big = poison_(torch.empty(B, P * nh, D + 5))
    out = out_big[..., :D]
    run_cpu_raw(cmod, q, kbuf, vbuf, mask, S, 0.2, 4, out=out)
    assert out_big[..., D:].isnan().all(), "wrote past the row"
    assert_within_torch_error(out, q, list(kbuf), list(vbuf), mask, S, 0.2)


def test_params_are_checked(cmod):
    q, kbuf, vbuf, _ = make_case(1, 1, 4, 2, 8, 16, False)
    run_cpu_raw(cmod, q, kbuf, vbuf, None, 8, 0.25, 1)  # valid
    with pytest.raises(ValueError, match="kv_len"):
        run_cpu_raw(cmod, q, kbuf, vbuf, None, 9, 0.25, 1)
    with pytest.raises(ValueError, match="num_splits"):
        run_cpu_raw(cmod, q, kbuf, vbuf, None, 8, 0.25, 0)
    q3, k3, v3, _ = make_case(1, 1, 3, 2, 8, 16, False)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        run_cpu_raw(cmod, q3, k3, v3, None, 8, 0.25, 1)
    p = cmod.DecodeAttnParams()
    with pytest.raises(AttributeError):
        p.num_head = 4  # a typo is an error, not a new attribute
    assert cmod.decode_attention_num_splits(1, 100_000, 132) == 128
    assert cmod.decode_attention_num_splits(4096, 100_000, 132) == 1
    assert cmod.decode_attention_num_splits(8, 100, 132) == 2


@pytest.mark.parametrize("layout", ["views", "separate", "seq_major", "capacity_slices"])
def test_cpu_wrapper_cache_layouts(cmod, layout):
    """compiled.decode_attention_cpu derives base + layer stride, or stacks."""
    B, P, nh, nkv, S, D = 2, 3, 6, 3, 40, 24
    q, kbuf, vbuf, mask = make_case(B, P, nh, nkv, S, D, True, seed=4)
    if layout == "views":
        kcs, vcs = list(kbuf), list(vbuf)
    elif layout == "separate":
        kcs, vcs = [c.clone() for c in kbuf], [c.clone() for c in vbuf]
    elif layout == "seq_major":  # one [B, S, P*nkv, D] buffer per K/V (heads of all layers)
        kcat = kbuf.permute(1, 3, 0, 2, 4).reshape(B, S, P * nkv, D).contiguous()
        vcat = vbuf.permute(1, 3, 0, 2, 4).reshape(B, S, P * nkv, D).contiguous()
        kcs = [kcat[:, :, j * nkv : (j + 1) * nkv].transpose(1, 2) for j in range(P)]
        vcs = [vcat[:, :, j * nkv : (j + 1) * nkv].transpose(1, 2) for j in range(P)]
    else:  # per-layer slices of larger-capacity caches, 5 layers apart
        kbig = torch.randn(2 * P, B, nkv, S + 7, D)[::2, :, :, :S]
        vbig = torch.randn(2 * P, B, nkv, S + 7, D)[::2, :, :, :S]
        kbig.copy_(kbuf), vbig.copy_(vbuf)
        kcs, vcs = list(kbig), list(vbig)
    base, step = compiled._layer_base(kcs, 33)
    if layout != "separate":
        assert base.data_ptr() == kcs[0].data_ptr(), "equally spaced views must not be copied"
        assert step == (kcs[1].data_ptr() - kcs[0].data_ptr()) // 4
    out = compiled.decode_attention_cpu(q, kcs, vcs, mask, kv_len=33, num_splits=3)
    assert_within_torch_error(out, q, kcs, vcs, mask, 33, 1 / math.sqrt(D))


def test_wrapper_input_errors(cmod):
    q, kbuf, vbuf, mask = make_case(2, 2, 4, 2, 8, 16, True)
    kcs, vcs = list(kbuf), list(vbuf)
    with pytest.raises(ValueError, match="multiple of P"):
        compiled.decode_attention_cpu(q[:, :7], kcs, vcs)
    with pytest.raises(ValueError, match=r"v_caches\[1\] has shape"):
        compiled.decode_attention_cpu(q, kcs, [vcs[0], vcs[1][:, :1]])
    with pytest.raises(TypeError, match="kv_mask must be bool or uint8"):
        compiled.decode_attention_cpu(q, kcs, vcs, mask.float())
    with pytest.raises(ValueError, match="kv_len must be in"):
        compiled.decode_attention_cpu(q, kcs, vcs, mask, kv_len=9)
    with pytest.raises(TypeError, match="float32 only"):
        compiled.decode_attention_cpu(q.half(), [c.half() for c in kcs], [c.half() for c in vcs])
    # uint8 masks work like bool ones
    torch.testing.assert_close(
        compiled.decode_attention_cpu(q, kcs, vcs, mask.to(torch.uint8)),
        compiled.decode_attention_cpu(q, kcs, vcs, mask),
    )


def test_fallback_without_cuda_is_reference(cmod):
    q, kbuf, vbuf, mask = make_case(1, 2, 2, 1, 9, 8, True)
    out = compiled.decode_attention(q, list(kbuf), list(vbuf), mask, 7)
    ref = compiled.decode_attention_reference(q, list(kbuf), list(vbuf), mask, 7)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_op_schema_and_fake_on_meta(cmod):
    """The custom op's registration and fake implementation, with meta tensors (no GPU needed)."""
    if not compiled.register_ops():
        pytest.skip("_C was built without CUDA: the op is not registered")
    assert compiled.register_ops()  # idempotent
    op = torch.ops.cqil.decode_attention_cuda.default
    assert "Tensor[] k_caches" in str(op._schema) and "Tensor? kv_mask" in str(op._schema)
    meta = dict(device="meta", dtype=torch.bfloat16)
    q = torch.empty(2, 3 * 4, 64, **meta)
    caches = [torch.empty(2, 2, 100, 64, **meta) for _ in range(3)]
    out = torch.ops.cqil.decode_attention_cuda(q, caches, caches, None, 50, 0.125)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == "meta"
    with pytest.raises(ValueError, match="kv_len"):
        torch.ops.cqil.decode_attention_cuda(q, caches, caches, None, 101, 0.125)
    with pytest.raises(TypeError, match="float32"):
        bad = [c.to(torch.float32) for c in caches]
        torch.ops.cqil.decode_attention_cuda(q, bad, bad, None, 50, 0.125)


def test_no_side_effects_at_import():
    code = textwrap.dedent(
        """
        import sys, torch
        import cqil_kernels
        assert "cqil_kernels._C" not in sys.modules, "import cqil_kernels loaded _C"
        import cqil_kernels.compiled
        assert "cqil_kernels._C" not in sys.modules, "import compiled loaded _C"
        try:
            torch.ops.cqil.decode_attention_cuda
            raise SystemExit("op registered at import")
        except (AttributeError, RuntimeError):
            pass
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cqil_kernels.compiled.load()  # built or not: no error, no warning
        assert not caught, [str(w.message) for w in caught]
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------------------------------------------
# (b) build


def _cxx():
    return next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None)


def _build_tools_missing():
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 not installed"
    if not shutil.which("cmake"):
        return "no cmake"
    if _cxx() is None:
        return "no C++ compiler"
    return None


def test_cmake_build(tmp_path):
    """CMake configure + build from the shared source list; CUDA too where nvcc is found."""
    missing = _build_tools_missing()
    if missing:
        pytest.skip(f"needs cmake, a C++ compiler and pybind11: {missing}")
    nvcc = shutil.which("nvcc") and not os.environ.get("CQIL_SKIP_CUDA_BUILD")
    build = tmp_path / "build"
    args = [f"-DPython_EXECUTABLE={sys.executable}", f"-DCQIL_WITH_CUDA={'ON' if nvcc else 'OFF'}"]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    cfg = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *args],
                         capture_output=True, text=True, timeout=300)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    res = subprocess.run(["cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 1)],
                         capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log
    assert "spill" not in log.lower(), f"ptxas reports register spills:\n{log}"
    built = list(build.glob("_C*.so")) + list(build.glob("_C*.pyd"))
    assert len(built) == 1, sorted(p.name for p in build.iterdir())
    sources = [ln for ln in (ROOT / "csrc/sources.txt").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    for src in sources:
        if src.endswith(".cu") and not nvcc:
            continue
        assert Path(src).name in log, f"{src} from csrc/sources.txt was not compiled"
    # Import the fresh module in a separate process (pybind11 types are process-global).
    check = (
        "import sys; sys.path.insert(0, sys.argv[1]); import _C; "
        f"assert _C.has_cuda is {bool(nvcc)}, _C.has_cuda; "
        "assert _C.decode_attention_num_splits(1, 1000, 100) == 16"
    )
    imp = subprocess.run([sys.executable, "-c", check, str(build)], capture_output=True,
                         text=True, timeout=120)
    assert imp.returncode == 0, imp.stdout + imp.stderr


# ------------------------------------------------------------------------------------------
# (c) CUDA


@pytest.fixture
def cuda_op(cuda_device, cmod):
    if not compiled.register_ops():
        pytest.skip("_C was built without CUDA (cqil::decode_attention_cuda not registered)")
    return torch.ops.cqil.decode_attention_cuda


# (B, P, nh, nkv, S, D, kv_len): GQA 3 (SmolLM2-like), MHA, odd D (scalar-load path), long kv
CUDA_CASES = [
    (1, 1, 1, 1, 1, 64, 1),
    (2, 3, 9, 3, 70, 64, 65),
    (3, 2, 8, 2, 300, 128, 257),
    (2, 2, 4, 4, 33, 72, 33),
    (1, 3, 6, 2, 41, 17, 40),
    (1, 2, 8, 1, 4096, 128, 4000),
    (4, 3, 32, 8, 1000, 256, 999),
]


@pytest.mark.gpu
@pytest.mark.parametrize("holes", [False, True], ids=["nomask", "holes"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "x".join(map(str, c)))
def test_cuda_op_matches_torch(cuda_op, case, dtype, holes):
    B, P, nh, nkv, S, D, kv_len = case
    q, kbuf, vbuf, mask = make_case(B, P, nh, nkv, S, D, holes, dtype=dtype, device="cuda",
                                    seed=sum(case))
    scale = 1.0 / math.sqrt(D)
    out = cuda_op(q, list(kbuf), list(vbuf), mask, kv_len, scale)
    assert_within_torch_error(out, q, list(kbuf), list(vbuf), mask, kv_len, scale, slack=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_raw_poisoned_and_separate_caches(cuda_op, cmod, dtype):
    """Raw launcher with NaN-poisoned output and workspace; caches that must be stacked."""
    B, P, nh, nkv, S, D, kv_len = 2, 3, 6, 2, 130, 128, 129
    q, kbuf, vbuf, mask = make_case(B, P, nh, nkv, S, D, True, dtype=dtype, device="cuda")
    kcs, vcs = [c.clone() for c in kbuf], [c.clone() for c in vbuf]
    dims = compiled._check_inputs(q, kcs, vcs, mask, kv_len, ("cuda",))
    out = poison_(torch.empty(B, P * nh, D, dtype=dtype, device="cuda"))
    # The op's own split count, so that both runs below round identically.
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    splits = cmod.decode_attention_num_splits(B * P * nh, kv_len, sms)
    assert splits > 1
    params, keep = compiled._make_params(cmod, q, kcs, vcs, mask, kv_len, 0.1, out, splits, dims)
    poison_(keep[-1])  # the workspace
    cmod.decode_attention_cuda(params, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert_within_torch_error(out, q, kcs, vcs, mask, kv_len, 0.1, slack=1e-5)
    torch.testing.assert_close(cuda_op(q, kcs, vcs, mask, kv_len, 0.1), out, rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_op_checks_and_opcheck(cuda_op):
    q, kbuf, vbuf, mask = make_case(2, 2, 4, 2, 64, 64, True, dtype=torch.bfloat16, device="cuda")
    args = (q, list(kbuf), list(vbuf), mask, 50, 0.125)
    torch.library.opcheck(cuda_op, args)
    with pytest.raises(ValueError, match=r"k_caches\[0\] is on cpu"):
        cuda_op(q, [c.cpu() for c in kbuf], list(vbuf), mask, 50, 0.125)
    with pytest.raises(TypeError, match="is torch.float16"):
        cuda_op(q, [c.half() for c in kbuf], list(vbuf), mask, 50, 0.125)
