"""The device's measured ceilings: read and copy bandwidth, bf16 matmul rate, L2 size.

Kernel and end-to-end numbers are judged against ceilings measured in the same run on the same
card (never a datasheet or another card's number): read bandwidth is the best of ``x.sum()``
over a tensor far larger than L2, copy bandwidth ``dst.copy_(src)`` counting bytes read plus
bytes written, both timed with CUDA events (perf_counter on the CPU).

    python benchmarks/ceilings.py            # prints the JSON of the current device
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch


def _time(fn, device: torch.device, repeats: int) -> list[float]:
    """Seconds per call of ``fn`` (after one untimed call), each call timed on its own."""
    fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _summary(nbytes: int, times: list[float], method: str) -> dict:
    best, med = min(times), statistics.median(times)
    return dict(bytes=nbytes, best_s=best, median_s=med, gbps=nbytes / best / 1e9, gbps_median=nbytes / med / 1e9,
                repeats=len(times), method=method)


# Larger than any current NVIDIA L2 (H100 50 MB, H200 60 MB): used if a torch build does not report it.
_L2_FALLBACK = 64 << 20


def l2_bytes(device) -> int | None:
    """L2 cache size of a CUDA device (from its properties); None on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return int(size) if size else _L2_FALLBACK


def default_size(device) -> int:
    """Bytes of the bandwidth tensors: 4 GiB on a GPU (>= 60x an H200's L2), 64 MiB on the CPU."""
    return 4 << 30 if torch.device(device).type == "cuda" else 64 << 20


def measure_read_bandwidth(device, nbytes: int | None = None, repeats: int = 10) -> dict:
    """Read bandwidth of ``x.sum()`` over an ``nbytes`` fp32 tensor (best of ``repeats``)."""
    device = torch.device(device)
    n = (nbytes or default_size(device)) // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    clock = "CUDA events" if device.type == "cuda" else "perf_counter"
    out = _summary(n * 4, _time(lambda: x.sum(), device, repeats), f"x.sum() over fp32, {clock}")
    del x
    _free(device)
    return out


def measure_copy_bandwidth(device, nbytes: int | None = None, repeats: int = 10) -> dict:
    """Copy bandwidth of ``dst.copy_(src)`` over ``nbytes`` (bytes read + bytes written counted)."""
    device = torch.device(device)
    n = (nbytes or default_size(device)) // 2 // 4  # the two buffers together are nbytes
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    clock = "CUDA events" if device.type == "cuda" else "perf_counter"
    out = _summary(2 * n * 4, _time(lambda: dst.copy_(src), device, repeats), f"dst.copy_(src) fp32, read + write, {clock}")
    del src, dst
    _free(device)
    return out


def measure_matmul_tflops(device, n: int | None = None, repeats: int = 10) -> dict:
    """bf16 (fp32 on the CPU) n x n x n matmul rate on random data (zeros run faster)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 256)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = _time(lambda: a @ b, device, repeats)
    del a, b
    _free(device)
    flops = 2.0 * n ** 3
    return dict(n=n, dtype=str(dtype).removeprefix("torch."), best_s=min(times), tflops=flops / min(times) / 1e12,
                tflops_median=flops / statistics.median(times) / 1e12, method="a @ b, random data")


def measure_all(device, nbytes: int | None = None) -> dict:
    """Read, copy, matmul and L2 of ``device`` in one dict."""
    return dict(read=measure_read_bandwidth(device, nbytes), copy=measure_copy_bandwidth(device, nbytes),
                matmul=measure_matmul_tflops(device), l2_bytes=l2_bytes(device))


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    json.dump(measure_all(dev), sys.stdout, indent=1)
    print()
