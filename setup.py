"""Packaging for ssl_distill (distribution name ``ssl-distill``)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

# The tested set is torch 2.14.1 / torchvision 0.29.1 (pinned by the Makefile);
# compatible newer releases are accepted.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "torchvision>=0.19",
    "timm>=1.0",
    "omegaconf>=2.3",
    "submitit>=1.5",
    # per-module FLOP tables (`ssl-distill models --flops`, ssl_distill/models/flops.py); imported only there
    "fvcore>=0.1.5",
    "numpy>=1.24",
    "pillow>=9.0",
    # SIMD colour jitter and Gaussian blur on uint8 crops (ssl_distill/data/augment.py); headless = no GUI
    # libraries. 4.10 is the first release built for numpy 2 (tested: 4.10.0.84 and 5.0.0.93).
    "opencv-python-headless>=4.10",
    "tqdm>=4.60",
]

EXTRAS = {
    # Real images for `make demo` and the tests: scikit-learn ships the digits data set,
    # scikit-image ships photographs. matplotlib draws the loss curve.
    "demo": ["scikit-learn>=1.3", "scikit-image>=0.22", "matplotlib>=3.7"],
    "dev": [
        "pytest>=8.0",
        "pytest-timeout>=2.2",
        "ruff>=0.5",
        "scikit-learn>=1.3",
        "scikit-image>=0.22",
        "matplotlib>=3.7",
        # interop tests against the real Hugging Face models (tests/test_hub_hf.py); 5.x renamed the DINOv2
        # modules in memory (q_proj/..., gate_proj/...) while keeping the 4.x names on disk, and both are tested.
        "transformers>=5.0",
    ],
    "xformers": ["xformers>=0.0.27"],
    # benchmarks/: the lightly + timm baseline of train_step.py, real photos for data_pipeline.py.
    "bench": ["lightly>=1.5", "scikit-learn>=1.3", "scikit-image>=0.22"],
    "tensorboard": ["tensorboard>=2.14"],
}

setup(
    name="ssl-distill",
    version="0.1.0",
    description="Self-supervised ViT pretraining in the DINOv2 / iBOT family: train, evaluate, model zoo.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["ssl_distill", "ssl_distill.*"]),
    package_data={"ssl_distill": ["py.typed"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["ssl-distill = ssl_distill.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
