"""Build script: the Python package always; the compiled module cqil_kernels._C only where it can be built.

Metadata lives in pyproject.toml. The compiled part is built by CMake (CMakeLists.txt), from the
one source list csrc/sources.txt that CMakeLists.txt reads too. It is optional: without cmake, a
C++ compiler or pybind11 it is skipped with a message and the package stays pure Python.

Environment switches:
  CQIL_SKIP_BUILD=1       build nothing compiled
  CQIL_SKIP_CUDA_BUILD=1  build the CPU part only, even where nvcc is found
  CQIL_REQUIRE_BUILD=1    a compiled module that cannot be built is an error, not a message
  CQIL_CUDA_ARCHS="90;80" CMAKE_CUDA_ARCHITECTURES (default 90;80)
  MAX_JOBS=N              parallel compile jobs (default: from cores and free memory)
  CMAKE_ARGS="..."        extra arguments for the CMake configure step
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SOURCES_FILE = ROOT / "csrc" / "sources.txt"
# Per compile job: nvcc on these kernels stays well under this (flash-attention budgets ~9 GB
# for its far larger templates).
MEM_PER_JOB_GB = 2.0


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"cqil_kernels setup: {msg}", file=sys.stderr, flush=True)


def read_sources() -> list:
    """csrc/sources.txt: one repo-relative path per line, '#' comments; shared with CMake."""
    lines = SOURCES_FILE.read_text().splitlines() if SOURCES_FILE.exists() else []
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def max_jobs() -> int:
    """MAX_JOBS if set, else min(cores, available memory / MEM_PER_JOB_GB), at least 1."""
    if os.environ.get("MAX_JOBS", "").isdigit():
        return max(1, int(os.environ["MAX_JOBS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    avail_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail_gb = int(line.split()[1]) / 2**20
                    break
    except OSError:
        pass
    jobs = cores or 1
    if avail_gb is not None:
        jobs = min(jobs, int(avail_gb // MEM_PER_JOB_GB))
    return max(1, jobs)


def _pybind11_cmake_dir():
    """pybind11's CMake package: from the Python package, else a system install (e.g. Debian's)."""
    try:
        import pybind11

        return pybind11.get_cmake_dir()
    except ImportError:
        pass
    prefixes = [p for p in os.environ.get("CMAKE_PREFIX_PATH", "").split(os.pathsep) if p]
    prefixes += [sys.prefix, "/usr/local", "/usr"]
    for prefix in prefixes:
        for sub in ("share/cmake/pybind11", "lib/cmake/pybind11", "lib64/cmake/pybind11",
                    "lib/x86_64-linux-gnu/cmake/pybind11", "lib/aarch64-linux-gnu/cmake/pybind11"):
            if (Path(prefix) / sub / "pybind11Config.cmake").exists():
                return str(Path(prefix) / sub)
    return None


def _cxx_compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(shlex.split(name)[0]):
            return name
    return None


def _nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None
    )


class CMakeExtension(Extension):
    """An extension whose sources are built by CMakeLists.txt (listed here for sdists/rebuilds)."""


class CMakeBuild(build_ext):
    def run(self):
        reason = self._skip_reason()
        if reason:
            _log(f"not building the compiled module ({reason}); the package stays pure Python")
            return
        try:
            super().run()
        except (subprocess.CalledProcessError, OSError) as exc:
            if _flag("CQIL_REQUIRE_BUILD"):
                raise
            _log(f"building the compiled module failed ({exc}); continuing without it "
                 "(set CQIL_REQUIRE_BUILD=1 to make this an error)")

    def get_source_files(self):
        # sdist takes the extensions' files from here: add the CMake build's headers and lists.
        files = list(super().get_source_files())
        for ext in self.extensions:
            files += [d for d in ext.depends if d not in files]
        return files

    def _skip_reason(self):
        if _flag("CQIL_SKIP_BUILD"):
            return "CQIL_SKIP_BUILD is set"
        missing = []
        if not shutil.which("cmake"):
            missing.append("cmake")
        if _cxx_compiler() is None:
            missing.append("a C++ compiler")
        if _pybind11_cmake_dir() is None:
            missing.append("pybind11")
        if not missing:
            return None
        reason = "no " + ", ".join(missing)
        if _flag("CQIL_REQUIRE_BUILD"):
            raise RuntimeError(f"CQIL_REQUIRE_BUILD is set but there is {reason}")
        return reason

    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        nvcc = None if _flag("CQIL_SKIP_CUDA_BUILD") else _nvcc()
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={_pybind11_cmake_dir()}",
        ]
        if nvcc:
            args += ["-DCQIL_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('CQIL_CUDA_ARCHS', '90;80')}"]
            _log(f"building the CPU and CUDA parts ({nvcc})")
        else:
            args += ["-DCQIL_WITH_CUDA=OFF"]
            why = "CQIL_SKIP_CUDA_BUILD is set" if _flag("CQIL_SKIP_CUDA_BUILD") else "no nvcc"
            _log(f"building the CPU part only ({why})")
        if shutil.which("ninja") and "CMAKE_GENERATOR" not in os.environ:
            args += ["-G", "Ninja"]
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = max_jobs()
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_temp), *args], check=True)
        subprocess.run(
            ["cmake", "--build", str(build_temp), "--parallel", str(jobs)], check=True
        )


setup(
    ext_modules=[
        CMakeExtension(
            "cqil_kernels._C",
            sources=read_sources(),
            # Not compiled by setuptools; listed so that sdists carry the whole CMake build
            # (CMakeBuild.get_source_files).
            depends=[*sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.h")),
                     "CMakeLists.txt", "csrc/sources.txt", "csrc/README.md"],
        )
    ],
    cmdclass={"build_ext": CMakeBuild},
)
