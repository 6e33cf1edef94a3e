"""Builds hybrid_engine._C from csrc/ with torch.utils.cpp_extension and ninja.

CUDA sources (csrc/**/*.cu) are compiled only when torch is a CUDA build and a CUDA
toolkit is found; on a CPU build of torch only the C++ sources are built.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "hybrid-engine builds a C++ extension against torch, so torch must be installed first:\n"
        "    pip install torch==2.13.0        (or the torch build for your CUDA version)\n"
        "then install this project with:\n"
        "    pip install --no-build-isolation ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True))


def extension():
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    cu_sources = sources("*.cu")
    with_cuda = bool(cu_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        return cpp_extension.CUDAExtension(
            "hybrid_engine._C",
            sources("*.cpp") + cu_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DWITH_CUDA"], "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "hybrid_engine._C",
        sources("*.cpp"),
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["hybrid_engine*", "rlhf*", "bench*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
