"""Build and install mla_patch.

The pure-Python package always installs. The CUDA extension `mla_patch._C` (csrc/) is built
only when torch with CUDA and nvcc are both present and MLA_PATCH_NO_EXT is not set; build it
with `pip install -e . --no-build-isolation` so it compiles against the installed torch.
MLA_PATCH_CUDA_ARCHS overrides the targets, e.g. "90a;80".
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

DEFAULT_ARCHS = "90a;80"


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _cuda_extension():
    """The extension, or None with a one-line reason printed (no GPU needed to build it)."""
    if os.environ.get("MLA_PATCH_NO_EXT"):
        print("mla_patch: MLA_PATCH_NO_EXT is set, installing the pure-PyTorch package only")
        return None, {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("mla_patch: torch is not importable at build time, installing the pure-PyTorch package only")
        return None, {}
    if torch.version.cuda is None or CUDA_HOME is None or shutil.which("nvcc") is None and not CUDA_HOME:
        print("mla_patch: no CUDA build of torch or no nvcc, installing the pure-PyTorch package only")
        return None, {}
    sources = sorted(glob.glob("csrc/*.cu")) + ["csrc/binding.cpp"]
    if not os.path.exists("csrc/binding.cpp"):
        return None, {}
    archs = os.environ.get("MLA_PATCH_CUDA_ARCHS", DEFAULT_ARCHS)
    # No -std flag: torch's extension builder picks the standard its headers need (C++20 since 2.10).
    nvcc_flags = [
        "-O3",
        "-lineinfo",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        f"--threads={os.environ.get('MLA_PATCH_NVCC_THREADS', '4')}",
        *_gencode_flags(archs),
    ]
    if os.environ.get("MLA_PATCH_TIMELINE_PHASES") == "1":  # the wgmma kernels' in-loop timeline stamps (csrc/common.cuh)
        nvcc_flags.append("-DMLA_PATCH_TIMELINE_PHASES=1")
    cxx_flags = ["-O3"]
    ext = CUDAExtension(
        name="mla_patch._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
    return ext, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext, cmdclass = _cuda_extension()

setup(
    name="mla_patch",
    version="0.1.0",
    description="Absorbed MLA decode on a compressed latent cache for HuggingFace transformers",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mla_patch", "mla_patch.*"]),
    package_data={"mla_patch": ["assets/*", "assets/*/*", "evals/README.md", "evals/data/*", "evals/tasks/*"]},
    entry_points={"console_scripts": ["mla-lm-eval = mla_patch.evals.cli:main"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "transformers>=5.17,<6", "accelerate>=1.0"],
    extras_require={
        "eval": ["lm-eval>=0.4.9", "datasets"],
        "dev": ["pytest>=8", "hypothesis>=6", "transformers[serving]", "matplotlib"],
        "serve": ["transformers[serving]"],
        "bench": ["matplotlib"],
    },
    ext_modules=[ext] if ext is not None else [],
    cmdclass=cmdclass,
)
