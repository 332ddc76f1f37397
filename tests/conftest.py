"""Shared test set-up.

Triton kernels run on the CPU through the interpreter, which must be switched on before any
kernel is decorated: pytest_configure runs before test modules are imported. With
``--device cuda`` the kernels are compiled for the GPU instead. Nothing here probes CUDA.
"""

import os

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="device for kernel and model tests (cpu: Triton interpreter; cuda: compiled kernels)",
    )


def pytest_configure(config):
    if config.getoption("--device") == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    # Fuzz tests draw the same examples on every run (CI must not fail at random); explore new
    # ones with --hypothesis-profile=explore.
    from hypothesis import settings

    settings.register_profile("deterministic", derandomize=True, database=None)
    settings.register_profile("explore", derandomize=False)
    if not config.getoption("hypothesis_profile", default=None):
        settings.load_profile("deterministic")


@pytest.fixture
def device(request):
    return request.config.getoption("--device")


def cuda_available() -> bool:
    """For skipif callables: probes CUDA only when a test asks, never at import."""
    import torch

    return torch.cuda.is_available()


@pytest.fixture
def cuda_device(request):
    if request.config.getoption("--device") != "cuda" or not cuda_available():
        pytest.skip("needs --device cuda and a CUDA GPU")
    return "cuda"


def poison_(t):
    """Fill a buffer the kernel must write with NaN, so a skipped element cannot pass."""
    return t.fill_(float("nan"))
