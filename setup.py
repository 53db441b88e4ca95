"""jax_inversion: textual inversion and its descendants for Stable Diffusion, in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="jax_inversion",
    version="0.1.0",
    description="Learn personalized concepts as token embeddings of Stable Diffusion models, in JAX/Flax.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["jax_inversion", "jax_inversion.*"]),
    include_package_data=True,
    package_data={"jax_inversion": ["assets/**/*", "toyworld/pretrained/**/*"]},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "numpy>=2.0",
        "safetensors>=0.8.0",
        "transformers>=5.23.0",
        "tokenizers>=0.23.3",
        "huggingface_hub>=2.4.0",
        "ml_collections>=1.1.0",
        "absl-py>=2.5.1",
        "Pillow>=13.0.0",
        "tqdm>=4.70.1",
        "tensorboardX>=2.6.5",
        "PyYAML>=6.0",
        "etils[epath]>=1.15.0",  # every path the job touches: local, or gs:// with the "gcs" extra
    ],
    extras_require={
        # The PyTorch reference stack for parity checks and export verification.
        # Install torch==2.13.0 (CPU) first; an unpinned torch pulls CUDA wheels.
        # libtpu (jax[tpu]) too: tests/test_tpu_compile.py compiles the train step for a TPU slice on the CPU.
        "test": ["torch>=2.13.0", "diffusers>=0.42.1", "pytest>=8.0", "pytest-xdist>=3.8.0", "import-linter>=2.1",
                 "gcsfs>=2026.10.1", "gcp-storage-emulator>=2026.7.19", "wandb>=0.31.0", "jax[tpu]>=0.10.2",
                 "filelock>=3.12"],  # tests/conftest.py: the tiny models built once, shared by the workers
        # jax-inversion compile --topology ...: libtpu compiles for TPU slices on any machine (JAX_PLATFORMS=cpu).
        "tpu": ["jax[tpu]>=0.10.2"],
        # gs:// workdirs, concept dirs and exports (etils.epath's GCS backend); Orbax/TensorStore need nothing more.
        "gcs": ["gcsfs>=2026.10.1"],
        # train.wandb=True
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["jax-inversion=jax_inversion.cli:run"]},
)
