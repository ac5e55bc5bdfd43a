"""Zero-copy access to pinned host memory from Triton kernels (unified virtual addressing).

The full KV cache lives in pinned host memory (``torch.empty(..., pin_memory=True)``). On a
64-bit system with unified addressing, such memory (allocated by ``cudaHostAlloc``) is mapped
into the device address space; a kernel may load from and store to it directly, each access
crossing PCIe. No copy engine, no ``cudaMemcpy``, no host synchronisation is involved, and the
launch is an ordinary kernel launch, so it can be captured in a CUDA graph.

Triton accepts such a tensor as a kernel argument as it is: its launcher translates every
pointer argument with ``cuPointerGetAttribute(CU_POINTER_ATTRIBUTE_DEVICE_POINTER)``, which
succeeds for mapped pinned memory and fails ("cannot be accessed from Triton (cpu tensor?)")
for pageable memory. :func:`kernel_arg` is the one place where every kernel turns a host
tensor into a kernel argument:

* CUDA tensors and tensors under the Triton interpreter (``TRITON_INTERPRET=1``, everything
  on the CPU) pass through unchanged;
* a CPU tensor for a real GPU launch must be pinned (checked outside graph capture, for a
  clear error instead of the launcher's).

The host memory must stay alive (and pinned) while kernels that use it may run; the callers
own the host store for the lifetime of the server.
"""

from __future__ import annotations

import torch

from .common import interpreter_forced


def kernel_arg(t: torch.Tensor):
    """Return what to pass to a Triton kernel for tensor ``t`` (device or pinned host)."""
    if t.is_cuda or interpreter_forced():
        return t
    if t.device.type != "cpu":
        raise ValueError(f"unsupported device {t.device} for a kernel argument")
    if not torch.cuda.is_current_stream_capturing() and not t.is_pinned():
        raise ValueError(
            "host tensor passed to a GPU kernel must be pinned (torch.empty(..., pin_memory=True)): "
            "kernels read/write it directly through unified addressing"
        )
    return t
