"""Every GPU check of the project in ONE call: run on a lent H100/H200 with one device command.

    bash benchmarks/gpu_check.sh                       # on the GPU machine: everything, ~8 min
    python benchmarks/gpu_check.py --out DIR [--budget-s 470] [--steps env kernels ...]
    python benchmarks/gpu_check.py --dry-run --out DIR # the same steps on the CPU (CI), tiny shapes

Nothing is built or installed: the checkout runs from PYTHONPATH, the compiled module
(``cqil_kernels._C``) is optional. Each step runs in its own process with its own timeout (a
hang, a crash or an illegal address in one step cannot take the others), in this order:

1. ``env``           device, versions, git revision / source hash; measured read, copy and bf16
                     matmul ceilings and the L2 size (``ceilings.py``)
2. ``splitk-stress`` every serial split op at real shapes, CUDA graph replayed 1000 times with
                     NaN-poisoned workspaces; identical results, counters zero, growth while a
                     graph is live (``splitk_stress.py``)
3. ``gpu-tests``     the GPU-only tests alone (``pytest_gpu_only.py``: tests that use the
                     ``cuda_device`` fixture or the ``gpu`` marker; no ``-x``)
4. ``kernels``       kernel GB/s at M = 1, SmolLM2-135M and Llama-7B shapes, P = 1, 2, 4, next to
                     cuBLAS, inputs rotated over >= 3x L2 (``bench_kernels.py``)
5. ``e2e``           ms/token, batch 1, context 256: HF eager, the engine without groups, P2, P4,
                     SmolLM2-135M and Llama-7B shapes (``e2e_decode.py``)
6. ``e2e-static``    HF static cache + torch.compile, only if time is left
7. ``ops-tests``     the kernel test files compiled for the GPU (odd shapes, fp32/fp16, fuzz), if
                     time is left
8. ``tile-sweep``    tiles and split counts of the decode GEMMs, for what remains (``tile_sweep.py``)

Every result is appended to ``OUT/results.jsonl`` the moment it is measured, one JSON object a
line: ``step``, ``status``, ``seconds``, ``payload``; each step ends with a line of status
``done`` / ``fail`` / ``timeout`` / ``error`` / ``skipped`` and its duration. A step killed at its
timeout keeps what it wrote. The steps' own output goes to ``OUT/gpu_check.log``; a short summary
is printed last. Exit status: 0 if every step that ran passed, else 1.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [p for p in (ROOT, HERE) if p not in sys.path]

from step_log import StepLog, read_lines  # noqa: E402

PY = sys.executable


class Step:
    """One step: its command, its own timeout (GPU / dry run), and the budget it needs to start."""

    def __init__(self, name, cap_s, dry_cap_s, argv, need_s=0.0, env=None, optional=False):
        self.name, self.cap_s, self.dry_cap_s, self.argv = name, cap_s, dry_cap_s, argv
        self.need_s, self.env, self.optional = need_s, env or {}, optional


def steps(out: str, jsonl: str, dry: bool, pytest_timeout: bool) -> list[Step]:
    """The steps in run order. ``argv(left_s)`` builds a step's command from the budget left."""
    tests = os.path.join(ROOT, "tests")
    per_test = ["--timeout", "240"] if pytest_timeout and not dry else []
    gpu_tests = ([PY, "-m", "pytest", "-q", "-rfE", "-p", "pytest_gpu_only", "-p", "no:cacheprovider", *per_test]
                 + (["--device", "cpu", os.path.join(tests, "test_ops_splitk.py"), os.path.join(tests, "test_engine.py")]
                    if dry else ["--device", "cuda", tests]))
    ops_tests = [PY, "-m", "pytest", "-q", "-rfE", "-p", "pytest_gpu_only", "-p", "no:cacheprovider", *per_test,
                 "--device", "cuda"] + sorted(os.path.join(tests, f) for f in os.listdir(tests)
                                              if f.startswith("test_ops_") and f.endswith(".py"))
    bench = [PY, os.path.join(HERE, "bench_kernels.py"), "--jsonl", jsonl, "--out", os.path.join(out, "bench_kernels.json"),
             "--M", "1"] + (["--cpu-smoke", "--P", "2", "--ops", "qkv_gemm", "gate_up_silu", "decode_attention_static"]
                            if dry else ["--P", "1", "2", "4"])
    e2e = [PY, os.path.join(HERE, "e2e_decode.py"), "--jsonl", jsonl, "--batches", "1", "--prefill-lengths"]
    if dry:
        e2e += ["--tiny", "--device", "cpu", "--shapes", "tiny-smollm2", "--contexts", "16", "--new-tokens", "4",
                "--repeats", "1", "--bandwidth-mb", "16"]
    else:
        e2e += ["--shapes", "smollm2-135m", "llama-7b", "--contexts", "256", "--new-tokens", "64"]
    return [
        Step("env", 60, 60, lambda left: [PY, os.path.abspath(__file__), "--env-step", "--jsonl", jsonl]
             + (["--dry-run"] if dry else [])),
        Step("splitk-stress", 80, 120, lambda left: [PY, os.path.join(HERE, "splitk_stress.py"), "--jsonl", jsonl]
             + (["--dry-run", "--P", "2"] if dry else [])),
        Step("gpu-tests", 130, 150, lambda left: gpu_tests, env={"CQIL_GPU_ONLY": "1", "CQIL_JSONL": jsonl,
                                                                 "CQIL_STEP": "gpu-tests"}),
        Step("kernels", 120, 240, lambda left: bench),
        Step("e2e", 170, 150, lambda left: e2e + ["--step", "e2e", "--out", os.path.join(out, "e2e.json"),
                                                  "--variants", "hf-eager", "engine", "engine-p2", "engine-p4"]),
        Step("e2e-static", 150, 60, lambda left: e2e + ["--step", "e2e-static", "--out", os.path.join(out, "e2e_static.json"),
                                                        "--variants", "hf-static-compiled", "--no-verify",
                                                        "--budget-s", str(max(0, int(left) - 10))],
             need_s=100, optional=True),
        Step("ops-tests", 120, 0, lambda left: None if dry else ops_tests, need_s=60, optional=True,
             env={"CQIL_GPU_ONLY": "exclude", "CQIL_JSONL": jsonl, "CQIL_STEP": "ops-tests"}),
        Step("tile-sweep", 600, 90, lambda left: [PY, os.path.join(HERE, "tile_sweep.py"), "--jsonl", jsonl,
                                                  "--deadline-s", str(max(5, int(left) - 15))]
             + (["--dry-run"] if dry else []), need_s=30, optional=True),
    ]


# ---------------------------------------------------------------------------------------------- step 1

def _source_hash() -> str:
    """sha256 over the package, benchmark and test sources: identifies the code without git."""
    h = hashlib.sha256()
    for top in ("cqil_kernels", "benchmarks", "tests", "csrc"):
        for dirpath, dirnames, files in sorted(os.walk(os.path.join(ROOT, top))):
            dirnames.sort()
            for f in sorted(files):
                if f.endswith((".py", ".cu", ".cpp", ".h", ".txt")):
                    path = os.path.join(dirpath, f)
                    h.update(os.path.relpath(path, ROOT).encode())
                    with open(path, "rb") as fh:
                        h.update(fh.read())
    return h.hexdigest()[:16]


def env_step(jsonl: str, dry: bool) -> int:
    """Device, versions, revision, and the measured ceilings (two lines)."""
    import torch

    from cqil_kernels.report import environment

    log = StepLog(jsonl, "env")
    device = "cpu" if dry else "cuda"
    info = dict(environment(device), source_sha256=_source_hash(), git_rev_file=None, python_executable=sys.executable,
                platform=platform.platform(), torch_cuda=torch.version.cuda)
    rev = os.path.join(ROOT, ".git_rev")  # written beside the checkout when .git does not travel
    if os.path.exists(rev):
        info["git_rev_file"] = open(rev).read().strip()
    for mod in ("triton", "transformers", "pytest", "hypothesis", "pytest_timeout"):
        spec = importlib.util.find_spec(mod)
        info[f"has_{mod}"] = spec is not None
    from cqil_kernels import compiled

    info["compiled_module"] = compiled.load() is not None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    l2_bytes=int(p.L2_cache_size), memory_bytes=int(p.total_memory))
        try:
            q = "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.draw,power.limit,temperature.gpu"
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True,
                                                text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = f"unavailable: {e}"
    log.emit("ok", dict(kind="environment", **info))
    print(json.dumps(info, indent=1, default=str))
    import ceilings

    c = ceilings.measure_all(device, None if device == "cuda" else 16 << 20)
    log.emit("ok", dict(kind="ceilings", read_gbps=c["read"]["gbps"], copy_gbps=c["copy"]["gbps"],
                        matmul_tflops=c["matmul"]["tflops"], **c))
    print(f"read {c['read']['gbps']:.1f} GB/s, copy {c['copy']['gbps']:.1f} GB/s, matmul {c['matmul']['tflops']:.1f} TFLOP/s, "
          f"L2 {c['l2_bytes']}")
    return 0


# ---------------------------------------------------------------------------------------------- driver

def run_step(step: Step, argv, timeout: float, log_path: str, extra_env: dict) -> tuple[str, int | None, float]:
    """Run one step in its own process group; (status, return code, seconds)."""
    env = dict(os.environ, **extra_env, **step.env)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    t0 = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as logf:
        logf.write(f"\n===== {step.name} (timeout {timeout:.0f} s): {' '.join(argv)}\n")
        logf.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "done" if rc == 0 else "fail"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step's own process group (pytest's children too)
            proc.wait()
            rc, status = None, "timeout"
        logf.write(f"===== {step.name}: {status} (rc {rc}) after {time.perf_counter() - t0:.1f} s\n")
    return status, rc, time.perf_counter() - t0


def _tail(path: str, n: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def summarize(jsonl: str) -> str:
    """A short text summary of the results file (the device tool returns the output's tail)."""
    lines = read_lines(jsonl)
    out = ["", "==== gpu_check summary"]
    for ln in lines:
        p = ln["payload"]
        if ln["step"] == "env" and p.get("kind") == "environment":
            out.append(f"device {p.get('gpu') or p.get('device')}  torch {p.get('torch')}  triton {p.get('triton')}  "
                       f"transformers {p.get('transformers')}  rev {p.get('git_revision')}  src {p.get('source_sha256')}")
        if ln["step"] == "env" and p.get("kind") == "ceilings":
            out.append(f"ceilings: read {p['read_gbps']:.0f} GB/s, copy {p['copy_gbps']:.0f} GB/s, "
                       f"bf16 matmul {p['matmul_tflops']:.0f} TFLOP/s, L2 {p.get('l2_bytes')}")
    for ln in lines:
        if ln.get("payload", {}).get("kind") == "step":
            p = ln["payload"]
            counts = ", ".join(f"{k} {v}" for k, v in sorted(p.get("statuses", {}).items()))
            out.append(f"  {ln['step']:14s} {ln['status']:8s} {ln['seconds']:7.1f} s  {counts}")
    bad = [ln for ln in lines if ln["status"] in ("fail", "error") and ln["payload"].get("kind") != "step"]
    for ln in bad[:15]:
        p = ln["payload"]
        what = p.get("nodeid") or " ".join(str(p.get(k)) for k in ("model", "shape", "op", "impl", "variant", "P") if p.get(k) is not None)
        out.append(f"  FAIL {ln['step']}: {what}: {' '.join(str(p.get('error') or p.get('message') or '').split())[-150:]}")
    if len(bad) > 15:
        out.append(f"  ... {len(bad) - 15} more failures in results.jsonl")
    # kernels: one line per (model, op, P): the fused kernel, then the baselines
    groups: dict = {}
    for ln in lines:
        r = ln["payload"]
        if ln["step"] == "kernels" and ln["status"] == "ok" and "GBps" in r:
            groups.setdefault((r["model"], r["op"], r["M"], r["P"]), []).append(r)
    if groups:
        out.append("kernels (us, GB/s, % of the read ceiling; inputs rotated over >= 3x L2):")
        short = {"triton_fused": "fused", "triton_kernel_reduce": "2-launch", "triton_kernel_combine": "2-launch",
                 "cublas_per_layer": "cuBLAS/layer", "torch_mm_stacked": "mm", "torch_bmm_stacked": "bmm",
                 "torch_bmm_sum": "bmm+sum", "sdpa_per_layer": "SDPA/layer", "torch_ops": "torch ops"}
        for (model, op, M, P), rs in groups.items():
            cells = [f"{short.get(r['impl'], r['impl'])} {r['us']:.1f} {r['GBps']:.0f} {r['frac_of_read']:.0%}" for r in rs]
            out.append(f"  {model[:8]:8s} {op:23s} M={M} P={P}: " + " | ".join(cells))
    for ln in lines:
        p = ln["payload"]
        if ln["step"] in ("e2e", "e2e-static") and p.get("kind") == "decode":
            ms = p.get("ms_per_token")
            what = f"{ms:8.3f} ms/token  floor {p['floor_ms']:.3f}  {p['pct_of_floor']:.0f}% of floor" if ms else (
                p.get("skipped") or p.get("error"))
            out.append(f"  e2e {p['shape']:13s} B={p['batch']} ctx={p['context']} {p['variant']:19s} {what}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "reports", "gpu"))
    ap.add_argument("--budget-s", type=float, default=470.0, help="wall clock for all steps together")
    ap.add_argument("--steps", nargs="*", default=None, help="run only these steps (names as in the docstring)")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU: interpreter, tiny shapes (CI)")
    ap.add_argument("--env-step", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jsonl", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.env_step:
        if args.dry_run:
            os.environ["TRITON_INTERPRET"] = "1"
        return env_step(args.jsonl, args.dry_run)

    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, "results.jsonl")
    log_path = os.path.join(args.out, "gpu_check.log")
    extra_env = {"TRITON_INTERPRET": "1"} if args.dry_run else {}
    all_steps = steps(args.out, jsonl, args.dry_run, importlib.util.find_spec("pytest_timeout") is not None)
    names = [s.name for s in all_steps]
    for s in args.steps or []:
        if s not in names:
            ap.error(f"unknown step {s!r}; steps: {' '.join(names)}")
    failed = False
    for step in all_steps:
        if args.steps and step.name not in args.steps:
            continue
        log = StepLog(jsonl, step.name)
        left = args.budget_s - (time.perf_counter() - t_start)
        cap = step.dry_cap_s if args.dry_run else step.cap_s
        argv = step.argv(left)
        if argv is None or cap <= 0:
            log.emit("skipped", dict(kind="step", reason="not part of the dry run (the CPU suite runs in ./test.sh)"), 0.0)
            continue
        if left < max(step.need_s, 10.0):
            log.emit("skipped", dict(kind="step", reason=f"{left:.0f} s of the budget left, the step needs {step.need_s:.0f} s"), 0.0)
            print(f"{step.name}: skipped, {left:.0f} s left", flush=True)
            continue
        before = len(read_lines(jsonl))
        status, rc, secs = run_step(step, argv, min(cap, left), log_path, extra_env)
        written = read_lines(jsonl)[before:]
        statuses = {}
        for ln in written:
            statuses[ln["status"]] = statuses.get(ln["status"], 0) + 1
        failed |= status != "done"
        log.emit(status, dict(kind="step", returncode=rc, cmd=" ".join(argv), lines=len(written), statuses=statuses,
                              log_tail=_tail(log_path) if status != "done" else ""), secs)
        print(f"{step.name}: {status} in {secs:.1f} s ({len(written)} result lines)", flush=True)
    text = summarize(jsonl)
    print(text)
    with open(os.path.join(args.out, "summary.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"\nresults: {jsonl}; log: {log_path}; {time.perf_counter() - t_start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
