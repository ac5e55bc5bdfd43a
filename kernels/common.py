"""Shared helpers of the kernel modules: backend dispatch and argument checks.

Every kernel wrapper takes ``impl=None`` and calls :func:`use_triton`:

* ``impl=None`` (default): Triton when any tensor argument lives on a CUDA device, or when
  the Triton interpreter is forced (``TRITON_INTERPRET=1`` set before Triton was imported);
  otherwise the plain-torch ``<op>_reference`` beside the kernel;
* ``impl="triton"`` / ``impl="torch"``: force one of them.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it.
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for the kernel modules)
except ImportError:  # pragma: no cover - the references still work
    triton = None
    tl = None

IMPLS = (None, "triton", "torch")

_TRITON_DTYPES = (torch.bfloat16, torch.float16)


def interpreter_forced() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    if triton is None:
        return False
    return bool(triton.knobs.runtime.interpret)


def use_triton(impl: str | None, *tensors: torch.Tensor | None) -> bool:
    """Decide between the Triton kernel and the torch reference (see module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if impl == "triton":
        if triton is None:
            raise RuntimeError("impl='triton' requested but Triton is not installed")
        if not on_cuda and not interpreter_forced():
            raise RuntimeError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
        return True
    return triton is not None and (on_cuda or interpreter_forced())


def is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def check_head_dim(d: int) -> None:
    if not is_pow2(d) or d < 16:
        raise NotImplementedError(f"head dim {d} is not supported by the Triton kernels: need a power of two >= 16")


def check_page_size(p: int) -> None:
    if not is_pow2(p):
        raise NotImplementedError(f"page size {p} is not supported by the Triton kernels: need a power of two")


def check_kv_dtype(dtype: torch.dtype) -> None:
    if dtype not in _TRITON_DTYPES:
        raise NotImplementedError(f"KV dtype {dtype} is not supported by the Triton kernels: use bf16 or fp16")


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 for a non-CUDA device, e.g. the interpreter)."""
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]
