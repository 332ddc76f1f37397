"""Helpers for the kernel tests (tests/test_ops_*.py).

Error budget (flash-attention's rule): the kernel's max abs error against a high-precision
reference must be at most twice the error of the same math done by torch at the working precision,
plus a floor of a few ulps at the output's scale. The floor matters when torch's own error is ~0 by
chance (tiny K, e.g. H = 1): the kernels round differently by design (rstd as 1/sqrt instead of
rsqrt, norm applied after the dot, one fp32 epilogue), which is a couple of ulps, amplified by the
SiLU(gate)*up product; 4 ulps at the output's scale covers that, while any indexing or masking bug
is off by O(1). The high-precision reference is the op's reference function on upcast inputs: fp64 when
the working dtype is fp32 (an fp32 "reference" would make torch's own error zero), fp32 otherwise.
"""

from __future__ import annotations

import pytest
import torch

from conftest import poison_

CPU_DTYPES = (torch.float32, torch.float16)
FLOOR_ULPS = 4


def hi_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def upcast(obj, dtype):
    """Upcast a tensor, None, or a list of tensors (floating tensors only)."""
    if obj is None:
        return None
    if isinstance(obj, (list, tuple)):
        return [upcast(o, dtype) for o in obj]
    return obj.to(dtype) if obj.is_floating_point() else obj


def nan_empty(shape, dtype, device) -> torch.Tensor:
    """A fresh output buffer the kernel must overwrite entirely."""
    return poison_(torch.empty(shape, dtype=dtype, device=device))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| in fp64; NaN anywhere yields inf so it can never pass a bound."""
    d = (a.to(torch.float64) - b.to(torch.float64)).abs()
    if torch.isnan(d).any():
        return float("inf")
    return d.max().item() if d.numel() else 0.0


def assert_error_budget(out: torch.Tensor, ref_hi: torch.Tensor, ref_lo: torch.Tensor, factor: float = 2.0):
    assert out.shape == ref_hi.shape, (out.shape, ref_hi.shape)
    assert torch.isfinite(ref_hi).all(), "reference is not finite: bad test inputs"
    err = max_err(out, ref_hi)
    torch_err = max_err(ref_lo, ref_hi)
    scale = ref_hi.abs().max().item() if ref_hi.numel() else 0.0
    floor = FLOOR_ULPS * torch.finfo(out.dtype).eps * max(scale, 1e-3)
    assert err <= factor * torch_err + floor, (
        f"kernel error {err:.3e} > {factor} x torch error {torch_err:.3e} + floor {floor:.1e}"
    )


@pytest.fixture
def poisoned_workspaces(monkeypatch):
    """Split-K / split-KV workspaces filled with NaN, so a program that skips its slice fails."""
    from cqil_kernels.launch_config import use_launch_config

    with use_launch_config(poison_workspaces=True):
        yield


def launch_config_for_test(request, **changes):
    """Launches for the rest of the test use these launch-config changes (undone at its end)."""
    from cqil_kernels.launch_config import use_launch_config

    scope = use_launch_config(**changes)
    scope.__enter__()
    request.addfinalizer(lambda: scope.__exit__(None, None, None))


def randn(*shape, dtype, device, scale=1.0, generator=None):
    return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)


def norm_weight(P, H, dtype, device, generator=None):
    # around 1 like trained RMSNorm weights, but distinct per layer so a wrong layer index shows
    return (0.5 + torch.rand(P, H, generator=generator)).to(device=device, dtype=dtype)


LAYOUTS = ("separate", "views", "unaligned")


def layer_tensors(P, shape, dtype, device, scale=1.0, generator=None, layout="separate"):
    """P per-layer weight tensors of ``shape``, as a layer's own parameters would be:

    - "separate": each its own allocation (what a loaded model has);
    - "views": slices of one [P, ...] buffer (what an older stacked layout had);
    - "unaligned": each at an odd element offset inside its own buffer, so the kernels' table
      sees offsets that are no multiple of 8 elements (the unaligned path).
    """
    if layout == "views":
        return list(randn(P, *shape, dtype=dtype, device=device, scale=scale, generator=generator).unbind(0))
    out = []
    for _ in range(P):
        t = randn(*shape, dtype=dtype, device=device, scale=scale, generator=generator)
        if layout == "unaligned":
            n = t.numel()
            buf = torch.empty(n + 1, dtype=dtype, device=device)
            buf[1:] = t.reshape(-1)
            t = buf[1:].view(shape)
        out.append(t)
    return out


def norm_weights(P, H, dtype, device, generator=None, layout="separate"):
    """P per-layer RMSNorm weights [H] around 1 (see :func:`norm_weight`)."""
    w = norm_weight(P, H, dtype, device, generator)
    if layout == "views":
        return list(w.unbind(0))
    return [layer_tensors(1, (H,), dtype, device, layout=layout)[0].copy_(w[j]) for j in range(P)]
