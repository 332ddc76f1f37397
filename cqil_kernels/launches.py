"""Count the kernels a call would launch on a GPU, on any device (the CPU included).

Inside a CUDA graph a kernel costs ~1.2 us of launch latency plus its own minimum duration, so a
small model's decode step is priced by how many kernels it launches. This module estimates that
count without a GPU, so it can be checked in CPU tests and compared between plans. What it counts
is dispatched operations, not launches it observes:

- every aten op that does work (not a view, not an allocation) is taken as one kernel. On the CPU
  no kernel is launched at all: these are torch ops run on the host, and the number is what the
  same ops would launch on a GPU under the one-kernel-per-op assumption. On a GPU too it counts
  ops, not CUDA launches: cuBLAS may launch a second kernel for its own split-K, some aten ops
  launch several, and neither is seen;
- every Triton launch (compiled, or through the interpreter with ``TRITON_INTERPRET=1``) is one
  kernel: these are real launches of the Triton kernels (on the CPU, interpreted ones). The custom
  ops that wrap them (``torch.ops.cqil.*``) count only through their launches;
- host synchronisations (``.item()``, ``.tolist()``, D2H copies) are counted apart: a decode
  step that needs one cannot be captured in a CUDA graph.

Example:
    >>> with LaunchCounter() as count:
    ...     engine.step(tokens)
    >>> count.total, count.by_name.most_common(5)
"""

from __future__ import annotations

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LaunchCounter"]

# aten ops that allocate or only touch metadata: no kernel.
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
    "lift_fresh", "set_", "resize_", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel",
    "is_same_size", "sym_storage_offset", "promote_types", "result_type",
}
_SYNC = {"_local_scalar_dense", "item", "equal", "is_nonzero", "nonzero"}


class _AtenMode(TorchDispatchMode):
    def __init__(self, counter: "LaunchCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        ns = func.namespace
        c = self.counter
        if ns != "aten":
            # a custom op (cqil::*): its Triton launches are counted by the launch hook
            c.custom_ops[f"{ns}::{name}"] += 1
        elif c._inside_launch == 0:
            if name in _SYNC:
                c.syncs += 1
            if not (func.is_view or name in _NO_KERNEL):
                if name in ("copy_", "_to_copy") and _crosses_device(args, kwargs):
                    c.syncs += 1
                c.by_name[f"aten::{name}"] += 1
        return func(*args, **kwargs)


def _crosses_device(args, kwargs) -> bool:
    devs = {a.device.type for a in args if isinstance(a, torch.Tensor)}
    dev = kwargs.get("device")
    if dev is not None:
        devs.add(torch.device(dev).type)
    return len(devs) > 1


class LaunchCounter(contextlib.AbstractContextManager):
    """Context manager: counts the kernels the code run inside it would launch on a GPU.

    Working aten ops count one each and Triton launches one each (see the module docstring): on
    the CPU the aten part counts torch ops run on the host, not kernel launches.

    Attributes:
        by_name: Counter of launches, ``aten::<op>`` and ``triton::<kernel>``.
        custom_ops: Counter of ``cqil::*`` custom-op calls (informational; not launches).
        syncs: host synchronisations seen (should be 0 in a graph-capturable step).
        total: sum of ``by_name``.
    """

    def __init__(self):
        self.by_name: collections.Counter = collections.Counter()
        self.custom_ops: collections.Counter = collections.Counter()
        self.syncs = 0
        self._inside_launch = 0
        self._mode = _AtenMode(self)
        self._restore = []

    @property
    def total(self) -> int:
        return sum(self.by_name.values())

    def triton_launches(self) -> int:
        return sum(n for k, n in self.by_name.items() if k.startswith("triton::"))

    def __enter__(self):
        self._patch_triton()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for obj, attr, old in reversed(self._restore):
            setattr(obj, attr, old)
        self._restore.clear()
        return False

    def _patch_triton(self) -> None:
        try:
            from triton.runtime import interpreter, jit
        except ImportError:  # no Triton: only aten ops can launch
            return
        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            old = cls.run
            self._restore.append((cls, "run", old))
            cls.run = self._wrap_run(old)

    def _wrap_run(self, run):
        counter = self

        def counted(fn, *args, **kwargs):
            if not kwargs.get("warmup", False):
                name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "kernel")
                counter.by_name[f"triton::{name}"] += 1
            # the interpreter moves arguments with torch ops of its own: not kernels of the call
            counter._inside_launch += 1
            try:
                return run(fn, *args, **kwargs)
            finally:
                counter._inside_launch -= 1

        return counted
