"""jaxlm: sparse and spiking language models in JAX, plus the standalone `ops` kernel package."""
from setuptools import find_packages, setup

setup(
    name="jaxlm",
    version="0.1.0",
    description="JAX research codebase for MoE/UniPool, native sparse attention and spiking LMs",
    python_requires=">=3.10",
    packages=find_packages(include=["jaxlm", "jaxlm.*", "ops", "ops.*", "third_party", "third_party.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "absl-py",
        "numpy",
        # grain: deterministic, resumable input pipelines (array_record reading).
        "grain>=0.2.10",
        # byte-level BPE trained locally on the corpus: no tokenizer download.
        "tokenizers>=0.20",
        # TensorBoard event files without pulling TensorFlow or full tensorboard.
        "tensorboardX>=2.6",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["jax[cuda13]"],
        "tpu": ["jax[tpu]"],
        "dev": ["pytest>=8", "pytest-xdist", "hypothesis"],
    },
)
