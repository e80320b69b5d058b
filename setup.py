from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent

setup(
    name="megatron-simreg",
    version="0.1.0",
    description="SimReg and JREG regularizers for Megatron-core / DeepSpeed LLM pretraining",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_simreg", "megatron_simreg.*"]),
    # zero_shot_tasks/: the local zero-shot tasks' data and lm-eval YAML templates (analysis/zero_shot.py).
    package_data={"megatron_simreg.analysis": ["data/*.txt", "zero_shot_tasks/*"]},
    # torch is a range on purpose: an installed torch (CPU or a cluster's CUDA
    # build) satisfies it and nothing is downloaded. tools/setup_env.sh installs
    # the CPU build first on a fresh machine.
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "datasketch",  # MinHash near-duplicate removal in the default corpus
    ],
    extras_require={
        # megatron-core 0.17+ needs Python >= 3.12; 0.16.1 is the floor.
        "megatron": ["megatron-core>=0.16.1,<0.20"],
        # DeepSpeed must be installed with --no-build-isolation after torch.
        "deepspeed": ["deepspeed>=0.19,<0.20"],
        "hf": ["transformers", "safetensors", "sentencepiece"],
        "test": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["megatron-simreg=megatron_simreg.cli:main"]},
)
