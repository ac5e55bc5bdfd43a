"""Package layout for freekv-sglang (metadata lives in pyproject.toml).

``freekv_sglang`` and all its subpackages are found automatically, with or
without an ``__init__.py``. The top-level ``kernels/`` folder is installed as
``freekv_sglang.kernels``: a top-level module named ``kernels`` would shadow
the Hugging Face ``kernels`` package that SGLang depends on. ``launch/`` holds
scripts and is not installed.
"""

from setuptools import find_namespace_packages, setup

NOT_CODE = ["*.__pycache__", "*.__pycache__.*", "__pycache__", "__pycache__.*"]
# Non-Python files shipped inside packages (kernel sources, fidelity texts...).
DATA_FILES = ["*.txt", "*.md", "*.json", "*.cu", "*.cuh", "*.h", "*.cpp"]

packages = find_namespace_packages(include=["freekv_sglang", "freekv_sglang.*"],
                                   exclude=NOT_CODE)
packages += ["freekv_sglang.kernels"] + [
    f"freekv_sglang.kernels.{sub}"
    for sub in find_namespace_packages(where="kernels", exclude=NOT_CODE)
]

setup(
    packages=packages,
    package_dir={"freekv_sglang.kernels": "kernels"},
    package_data={"": DATA_FILES},
)
