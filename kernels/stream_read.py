"""A streaming read of a whole buffer: the floor a memory-bound kernel of the same bytes can reach.

``bench_kernels.py`` times it over the selection's digests in the same CUDA-graph harness as the
selection, so "the time to read the digests at HBM speed" is also measured as a kernel of that size
actually achieves it (launch, ramp-up and tail included), not only as bytes over the bulk-copy bandwidth.

Program ``p`` of a grid of ``G`` sums blocks ``p, p + G, p + 2G, ...`` of ``BLOCK`` elements
(neighbouring programs read neighbouring blocks)::

    out[p] = sum_i x[(i * G + p) * BLOCK : (i * G + p + 1) * BLOCK]      (fp32, past the end: 0)
"""

from __future__ import annotations

import torch

from .common import cdiv, tl, triton, use_triton

if triton is not None:

    @triton.jit
    def _stream_sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr, STAGES: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        grid = tl.num_programs(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.range(0, ITERS, num_stages=STAGES):
            start = (i * grid + pid) * BLOCK
            acc += tl.load(x_ptr + start + offs, mask=start + offs < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def stream_sum_reference(x: torch.Tensor, n_programs: int, block: int) -> torch.Tensor:
    """Plain torch: fp32 ``[n_programs]`` per-program sums of the flattened ``x`` as the kernel splits it."""
    flat = x.reshape(-1).float()
    iters = cdiv(flat.numel(), n_programs * block)
    padded = torch.zeros(iters * n_programs * block, dtype=torch.float32, device=x.device)
    padded[: flat.numel()] = flat
    return padded.view(iters, n_programs, block).sum(dim=(0, 2))


def stream_sum(x: torch.Tensor, out: torch.Tensor, *, block: int = 4096, num_warps: int = 8,
               num_stages: int = 3, impl: str | None = None) -> torch.Tensor:
    """Read every element of contiguous ``x`` (any float dtype) once; ``out`` fp32 ``[n_programs]`` gets the
    per-program sums (the grid is ``out.numel()`` programs). ``block``: elements per load, a power of two.
    No host synchronisation; CUDA-graph capturable."""
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    if out.dtype != torch.float32 or out.dim() != 1 or out.numel() < 1:
        raise ValueError(f"out must be a non-empty fp32 vector, got {tuple(out.shape)} {out.dtype}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if not use_triton(impl, x, out):
        out.copy_(stream_sum_reference(x, out.numel(), block))
        return out
    n = x.numel()
    iters = cdiv(n, out.numel() * block)
    _stream_sum_kernel[(out.numel(),)](x, out, n, BLOCK=block, ITERS=iters, STAGES=num_stages, num_warps=num_warps)
    return out
