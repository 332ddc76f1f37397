"""Compile the project's Triton kernels for an NVIDIA GPU on a machine without one.

Triton's front end, its LLVM back end and ptxas all run on the CPU; only loading and launching a
kernel needs a driver. So the kernels, with the exact arguments and constexprs the ops pass at
run time, can be compiled for sm_90 (H100) here, which catches what the interpreter cannot:
typing errors in runtime branches, constexpr specialisation (an int argument equal to 1 becomes a
constexpr), illegal atomics, register or shared-memory overflows.

Two halves:
- :class:`LaunchRecorder` (in a process with the interpreter on) records every Triton launch as a
  JSON-able description: kernel module and name, each argument's type, value or alignment, the
  keyword constexprs and options. ``dry=True`` records without running the kernel, so real model
  shapes cost nothing;
- ``python benchmarks/gpu_compile.py launches.json [arch] [--ptxas-info]`` (a fresh process,
  interpreter off) compiles each description with ``triton.compile`` for the target and prints
  one JSON result per kernel; with ``--ptxas-info`` also the registers and spills ptxas reports.

Used by ``tests/test_gpu_compile.py`` (every kernel compiles) and ``benchmarks/sm90_resources.py``
(registers / spills / shared memory at the real shapes).
"""

from __future__ import annotations

import json
import sys

# constexprs that only exist for the interpreter's sake; on a GPU they take these values
_GPU_CONSTEXPRS = {"UPCAST": False, "RNE_BF16": False}


def _describe(value):
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return {"value": value}
    raise TypeError(f"cannot describe kernel argument of type {type(value).__name__}")


class LaunchRecorder:
    """Context manager recording interpreted Triton launches (``records``: list of dicts)."""

    def __init__(self, dry: bool = False):
        self.records: list[dict] = []
        self.dry = dry
        self._old = None

    def __enter__(self):
        from triton.runtime import interpreter

        self._cls = interpreter.InterpretedFunction
        self._old = self._cls.run
        recorder, old = self, self._old

        def run(fn, *args, grid, warmup, **kwargs):
            recorder.records.append(recorder._record(fn, args, kwargs))
            if recorder.dry:
                return None  # outputs stay as allocated: only the launch is of interest
            return old(fn, *args, grid=grid, warmup=warmup, **kwargs)

        self._cls.run = run
        return self

    def __exit__(self, *exc):
        self._cls.run = self._old
        return False

    @staticmethod
    def _record(fn, args, kwargs):
        py = fn.fn
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        named = {k: _describe(v) for k, v in kwargs.items() if k not in options}
        upcast = bool(kwargs.get("UPCAST", False))
        for k, v in _GPU_CONSTEXPRS.items():
            if k in named:
                named[k] = {"value": v}
        if upcast and "DOT_PREC" in named:
            named["DOT_PREC"] = {"value": "tf32"}  # bf16 operands go to the tensor cores on the GPU
        return {
            "module": py.__module__, "name": py.__name__,
            "args": [_describe(a) for a in args], "kwargs": named, "options": options,
        }

    def unique(self) -> list[dict]:
        seen, out = set(), []
        for r in self.records:
            key = json.dumps(r, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(r)
        return out


def _example(desc):
    import torch

    if "tensor" in desc:
        t = torch.empty(64, dtype=getattr(torch, desc["tensor"]))
        return t if desc["aligned"] else t[1:]
    return desc["value"]


def compile_record(rec: dict, target, ptxas_info: bool = False) -> dict:
    """Compile one recorded launch for ``target``; returns {"ok", "error"?, "shared", "name", ...}."""
    import importlib

    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import native_specialize_impl

    kernel = getattr(importlib.import_module(rec["module"]), rec["name"])
    backend = make_backend(target)
    values = [_example(d) for d in rec["args"]]
    names = [p.name for p in kernel.params]
    bound = dict(zip(names, values))
    bound.update({k: _example(d) for k, d in rec["kwargs"].items()})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        if p.name not in bound:
            bound[p.name] = p.default
        v = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = v
            continue
        ty, spec = native_specialize_impl(type(backend), v, False, not p.do_not_specialize, True)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = v
        if isinstance(spec, str):
            attrs[(i,)] = backend.parse_attr(spec)
    options = backend.parse_options(dict(rec["options"]))
    flags = ", ".join(f"{k}={d.get('value')}" for k, d in sorted(rec["kwargs"].items()) if k.isupper())
    label = f"{rec['name']}[{flags}]"
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - reported per kernel
        return {"name": label, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    out = {"name": label, "kernel": rec["name"], "ok": True, "shared": compiled.metadata.shared,
           "num_warps": options.num_warps, "num_stages": options.num_stages, "tag": rec.get("tag")}
    if ptxas_info:
        out.update(_ptxas_info(compiled.asm["ptx"]))
    if rec.get("keep_ptx"):
        out["ptx"] = compiled.asm["ptx"]
    return out


def _ptxas_info(ptx: str) -> dict:
    """Registers and spill bytes per thread as ptxas reports them for the PTX's own target."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        ptxas = get_ptxas(int(re.search(r"\d+", arch).group(0))).path
        proc = subprocess.run([ptxas, f"-arch={arch}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill_st = re.search(r"(\d+) bytes spill stores", text)
    spill_ld = re.search(r"(\d+) bytes spill loads", text)
    return {"arch": arch, "registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill_st.group(1)) if spill_st else None,
            "spill_load_bytes": int(spill_ld.group(1)) if spill_ld else None}


def main(argv=None) -> int:
    from triton.backends.compiler import GPUTarget

    argv = sys.argv[1:] if argv is None else argv
    info = "--ptxas-info" in argv
    argv = [a for a in argv if a != "--ptxas-info"]
    path, arch = argv[0], int(argv[1]) if len(argv) > 1 else 90
    records = json.load(open(path))
    target = GPUTarget("cuda", arch, 32)
    results = [compile_record(r, target, info) for r in records]
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
