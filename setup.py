from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
for line in (here / "bit_zoo" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        version["v"] = line.split("=")[1].strip().strip('"')

setup(
    name="bit_zoo",
    version=version["v"],
    description="Big Transfer (BiT) ResNet-v2 models for MindSpore: BiT-S and BiT-M, R50x1 to R152x4, with upstream weights",
    long_description=(here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["bit_zoo", "bit_zoo.*"]),
    py_modules=["bit_zoo_malloc"],  # standard library only: the scripts import it before MindSpore
    # ImageNet-1k / -21k class names (copied from timm; see bit_zoo/weights/_data/SOURCES.md)
    package_data={"bit_zoo.weights": ["_data/*.txt", "_data/*.md"], "bit_zoo.models": ["_kernels/*.cc", "_kernels/onednn/*", "_kernels/onednn/oneapi/dnnl/*"]},
    python_requires=">=3.10,<3.13",
    install_requires=[
        "mindspore>=2.7.0,<2.11",
        # mindspore 2.10's first eager op raises SystemError under numpy 2
        "numpy>=1.21,<2",
        "pyyaml>=5.4",
        "tqdm>=4.60",
        "mindcv>=0.3,<0.4",
        "safetensors>=0.4",
        "pillow>=9",
        "matplotlib>=3.5",
        "scikit-learn>=1.0",
    ],
    extras_require={
        "test": ["pytest>=7", "onnx>=1.14", "onnxruntime>=1.16", "fsspec>=2023.1", "s3fs>=2023.1", "moto[server]>=5"],
        # remote data and outputs: s3:// (OBS, any S3 store) and other fsspec protocols; see bit_zoo/utils/remote.py
        "cloud": ["fsspec>=2023.1", "s3fs>=2023.1"],
        # the independent reference for the parity tests (torch + timm); see README
        "parity": ["timm>=0.9"],
        # ONNX export (python -m bit_zoo.convert --output model.onnx) and running the result
        "onnx": ["onnx>=1.14", "onnxruntime>=1.16"],
    },
    entry_points={"console_scripts": ["bit-zoo=bit_zoo.__main__:main", "bit-zoo-convert=bit_zoo.tools.convert:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
