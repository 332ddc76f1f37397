"""The optional Triton import, the dispatch rule, and what the Triton interpreter needs.

Triton is optional. When it is missing, ``triton.jit`` becomes a no-op decorator and ``tl`` a stub
that only has to survive the kernel *definitions* (``tl.constexpr`` annotations); no kernel is
ever launched then, because :func:`use_triton` returns False and every op takes its torch
reference path.

The interpreter (``TRITON_INTERPRET=1``, CPU tests) differs from a GPU in ways the kernels must
know about: bf16 ``tl.dot`` is computed wrongly (operands are upcast, :func:`dot_flags`), fp32 ->
bf16 stores truncate (``_buffers.kernel_out``), and NumPy >= 2.4 refuses its runtime loop bounds
(:func:`_interpreter_numpy_compat`).
"""

import functools
import os

import torch

try:  # Triton is an optional dependency ([triton] extra; CUDA wheels of torch bring it).
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    HAS_TRITON = False

    class _TritonStub:
        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(0, int(n) - 1).bit_length()

    class _TlStub:
        constexpr = object()

    triton = _TritonStub()
    tl = _TlStub()

__all__ = [
    "HAS_TRITON", "INTERPRETED_AT_IMPORT", "triton", "tl", "triton_usable", "use_triton", "interpreted",
    "dot_flags", "dot_acc", "cdiv", "next_pow2",
]

# The interpreter is chosen when a kernel is *decorated* (module import), not when it runs, so a
# CPU launch is only safe if TRITON_INTERPRET was already "1" when this module was imported.
INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(device) -> bool:
    """True when a Triton kernel can run for tensors on ``device``.

    Triton must be importable and either the device is CUDA (compiled kernels) or the
    interpreter is on (``TRITON_INTERPRET=1``, checked now and when the kernels were decorated).
    """
    if not HAS_TRITON:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return (
        device.type == "cpu"
        and os.environ.get("TRITON_INTERPRET") == "1"
        and INTERPRETED_AT_IMPORT
    )


def use_triton(t: torch.Tensor) -> bool:
    """Dispatch rule of every public op: Triton on CUDA or under the interpreter, else torch."""
    return triton_usable(t.device)


def interpreted(t: torch.Tensor) -> bool:
    """True when a launch for ``t`` goes through the Triton interpreter (not on a GPU). On first
    use it also applies :func:`_interpreter_numpy_compat`."""
    if t.device.type == "cuda":
        return False
    _interpreter_numpy_compat()
    return True


@functools.lru_cache(maxsize=None)
def _interpreter_numpy_compat() -> None:
    """Let the Triton 3.6 interpreter run ``range(runtime_scalar)`` loops under NumPy >= 2.4.

    The interpreter wraps every scalar kernel argument as a 1-element array and implements
    ``tensor.__index__`` as ``int(array)``, which NumPy 2.4 rejects for arrays with ndim > 0; so
    any K loop with a runtime bound fails on the CPU. Kernels must keep runtime bounds (a
    constexpr bound recompiles per shape on the GPU), so the interpreter's ``__index__`` is
    redefined to read the single element. Applied lazily at the first interpreted launch, only
    when NumPy actually refuses the conversion; compiled GPU kernels are unaffected.
    """
    if not HAS_TRITON:
        return
    import numpy as np

    try:
        int(np.array([1]))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_cqil_compat", False):
        return

    def _index(self):
        data = self.handle.data
        return int(data.reshape(-1)[0]) if data.size == 1 else int(data)

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    patched._cqil_compat = True
    interpreter._patch_lang_tensor = patched


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_flags(dtype: torch.dtype, t: torch.Tensor) -> tuple[bool, str]:
    """(UPCAST, DOT_PREC) constexprs for tl.dot.

    UPCAST: the interpreter computes bf16 tl.dot wrongly, so bf16 operands are upcast to fp32
    there (never on the GPU, where bf16 tensor cores are the point). The interpreter also rounds
    fp32 -> bf16 casts towards zero, so under UPCAST kernels keep operands they computed in fp32.
    DOT_PREC: fp32 inputs must not silently go through TF32 (torch's F.linear does not by default).
    Calling it also readies the interpreter (see :func:`interpreted`).
    """
    upcast = interpreted(t) and dtype == torch.bfloat16
    prec = "ieee" if dtype == torch.float32 or upcast else "tf32"
    return upcast, prec


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """``acc + a @ b`` in fp32: tensor cores in b's dtype, or fp32 operands under UPCAST (see
    :func:`dot_flags`)."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PREC)
    else:
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PREC)
    return acc
