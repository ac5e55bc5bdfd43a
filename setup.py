"""Package layout for freekv-sglang (metadata lives in pyproject.toml).

``freekv_sglang`` and all its subpackages are found automatically. The
top-level ``kernels/`` folder is installed as ``freekv_sglang.kernels``: a
top-level module named ``kernels`` would shadow the Hugging Face ``kernels``
package that SGLang depends on. ``launch/`` holds scripts and is not installed.
"""

from setuptools import find_packages, setup

KERNEL_SOURCES = ["*.cu", "*.cuh", "*.h", "*.cpp"]

packages = find_packages(include=["freekv_sglang", "freekv_sglang.*"])
packages += ["freekv_sglang.kernels"] + [
    f"freekv_sglang.kernels.{sub}" for sub in find_packages(where="kernels")
]

setup(
    packages=packages,
    package_dir={"freekv_sglang.kernels": "kernels"},
    package_data={"freekv_sglang.kernels": KERNEL_SOURCES},
)
