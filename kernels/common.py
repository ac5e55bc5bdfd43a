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


#: Storage dtype of an FP8 KV tier (``--freekv-kv-storage fp8_e4m3``) and its largest finite value.
FP8_STORAGE = torch.float8_e4m3fn
FP8_MAX = 448.0


def check_tier_dtype(tier: torch.dtype, compute: torch.dtype) -> None:
    """A KV tier holds the model's dtype (bf16/fp16) or FP8 e4m3 beside a bf16/fp16 model."""
    check_kv_dtype(compute)
    if tier != compute and tier != FP8_STORAGE:
        raise NotImplementedError(f"KV tier dtype {tier} beside KV dtype {compute}: use {compute} or {FP8_STORAGE}")


def fp8_roundtrip(t: torch.Tensor) -> torch.Tensor:
    """``t`` as an FP8 tier stores it and a recall reads it back (saturating at +-448), in ``t``'s dtype."""
    return t.clamp(-FP8_MAX, FP8_MAX).to(FP8_STORAGE).to(t.dtype)


def to_tier(values: torch.Tensor, tier: torch.Tensor) -> torch.Tensor:
    """``values`` converted for storing in ``tier`` (saturating into FP8's range for an FP8 tier)."""
    if tier.dtype == FP8_STORAGE:
        values = values.float().clamp(-FP8_MAX, FP8_MAX)
    return values.to(device=tier.device, dtype=tier.dtype)


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


# --------------------------------------------------------------------------- KV tiers
# The full KV lives in the pinned host tier (pages 0 .. n_host-1, page 0 the padding page) and,
# optionally, in a GPU tier that extends it (pages n_host .. n_host+n_gpu-1, GPU memory of the same
# [n_gpu, Hkv, P, D] layout). Kernels take both and route every page by its number.


def check_gpu_tier(host_k: torch.Tensor, gpu_k: torch.Tensor | None, gpu_v: torch.Tensor | None) -> None:
    """``gpu_k``/``gpu_v`` are both None or both ``[n_gpu, Hkv, P, D]`` contiguous CUDA tensors of the
    host tier's dtype and page shape."""
    if (gpu_k is None) != (gpu_v is None):
        raise ValueError("gpu_k and gpu_v go together")
    if gpu_k is None:
        return
    if gpu_k.shape != gpu_v.shape or gpu_k.shape[1:] != host_k.shape[1:] or gpu_k.dtype != host_k.dtype:
        raise ValueError(f"GPU tier {tuple(gpu_k.shape)} {gpu_k.dtype} does not match the host tier's pages "
                         f"{tuple(host_k.shape[1:])} {host_k.dtype}")
    if not (gpu_k.is_contiguous() and gpu_v.is_contiguous()):
        raise ValueError("GPU tier tensors must be contiguous")


def tier_write_reference(host: torch.Tensor, gpu: torch.Tensor | None, page: torch.Tensor, head, row,
                         values: torch.Tensor) -> None:
    """``tier[page, head, row, :] = values`` over the two tiers (plain torch; ``page`` int64 on any device,
    ``head`` and ``row`` index tensors or slices broadcast like the tiers' advanced indexing)."""
    n_host = host.shape[0]
    in_gpu = page >= n_host
    def on(x, dev):
        return x.to(dev) if torch.is_tensor(x) else x

    if gpu is None or not bool(in_gpu.any()):
        host[page.to(host.device), on(head, host.device), on(row, host.device)] = to_tier(values, host)
        return
    ih = ~in_gpu
    hh = head[ih] if torch.is_tensor(head) else head
    hr = row[ih] if torch.is_tensor(row) else row
    gh = head[in_gpu] if torch.is_tensor(head) else head
    gr = row[in_gpu] if torch.is_tensor(row) else row
    host[page[ih].to(host.device), on(hh, host.device), on(hr, host.device)] = to_tier(values[ih], host)
    gpu[(page[in_gpu] - n_host).to(gpu.device), on(gh, gpu.device), on(gr, gpu.device)] = to_tier(values[in_gpu], gpu)


def tier_read_reference(host: torch.Tensor, gpu: torch.Tensor | None, page: torch.Tensor, head: torch.Tensor,
                        device: torch.device) -> torch.Tensor:
    """``tier[page, head]`` (``[N, P, D]`` on ``device``) over the two tiers (plain torch)."""
    n_host = host.shape[0]
    out = torch.empty((page.shape[0], *host.shape[2:]), dtype=host.dtype, device=device)
    in_gpu = page >= n_host if gpu is not None else torch.zeros_like(page, dtype=torch.bool)
    ih = ~in_gpu
    out[ih.to(device)] = host[page[ih].to(host.device), head[ih].to(host.device)].to(device)
    if gpu is not None and bool(in_gpu.any()):
        out[in_gpu.to(device)] = gpu[(page[in_gpu] - n_host).to(gpu.device), head[in_gpu].to(gpu.device)].to(device)
    return out
