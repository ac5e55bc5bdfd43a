"""tests/gpu needs a CUDA device. Without one, each test module here is reported
as one skipped test and is not even imported (modules may touch CUDA at import).
"""

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


CUDA = _cuda_available()


class _NeedsCuda(pytest.Item):
    def runtest(self):
        pytest.skip(f"{self.path.name}: needs a CUDA device")

    def reportinfo(self):
        return self.path, 0, self.name


class _SkippedModule(pytest.File):
    def collect(self):
        yield _NeedsCuda.from_parent(self, name="needs_cuda")


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path, parent):
    if not CUDA:
        return _SkippedModule.from_parent(parent, path=module_path)
    return None
