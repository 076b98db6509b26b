"""RingX packaging. The version number lives only in ringX/version.py."""
import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "ringX" / "version.py").read_text()).group(1)

setup(
    name="ringX",
    version=version,
    description="Exact context-parallel attention (ringX1-4) for long-context training on HPC systems",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ringX", "ringX.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "numpy"],
    extras_require={
        "test": ["pytest", "hypothesis", "pyyaml", "transformers", "safetensors", "h5py", "matplotlib"],
        "mpi": ["mpi4py"],
        "flash-attn": ["flash-attn"],
        "fa4": ["flash-attn-4>=4.0.0b40"],                        # FlashAttention-4 (Hopper, Blackwell)
        "deepspeed": ["deepspeed"],
        "liger": ["liger-kernel>=0.8"],                           # app/gpt --kernels liger|auto (CUDA)
        "hf": ["transformers>=5.0,<6", "safetensors"],          # ringX.hf, app/hf
        "apps": ["pyyaml", "tqdm", "safetensors", "matplotlib", "h5py"],
    },
    license="BSD-3-Clause",
)
