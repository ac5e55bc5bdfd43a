"""Benchmark-only synthetic decode queries in one launch (``FREEKV_BENCH_QUERY_COSINE``).

``out[b, h] = u[rows[b] % R, h] + sigma * sqrt(D) * q[b, h] / max(|q[b, h]|, 1e-6)`` with ``u`` the
layer's fixed directions ``[R, Hq, D]`` (float32): consecutive queries of a head then have cosine
about ``1 / (1 + sigma^2)`` (see :mod:`freekv_sglang.runtime.synthetic`). The reference is the
torch expression; the kernel does it per request in one program, so that the benchmark's locality
setting costs one launch per layer instead of about eight small torch kernels, which FreeKV's
timed step would otherwise carry and dense attention would not.
"""

from __future__ import annotations

import math

import torch

from .common import check_head_dim, next_pow2, tl, triton, use_triton

if triton is not None:

    @triton.jit
    def _mix_kernel(q_ptr, u_ptr, rows_ptr, out_ptr, stride_qb, stride_qh, stride_ob, stride_oh, n_slots, sigma,
                    HQ: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, D)
        hm = (h < HQ)[:, None] & (d[None, :] >= 0)
        q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + d[None, :], mask=hm, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(q * q, axis=1))
        e = q / tl.maximum(norm, 1e-6)[:, None] * tl.sqrt(D * 1.0)
        slot = tl.load(rows_ptr + b).to(tl.int64) % n_slots
        u = tl.load(u_ptr + (slot * HQ + h[:, None]) * D + d[None, :], mask=hm, other=0.0)
        out = u + sigma * e
        tl.store(out_ptr + b * stride_ob + h[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=hm)


def mix_queries_reference(q: torch.Tensor, u: torch.Tensor, rows: torch.Tensor, sigma: float) -> torch.Tensor:
    """Plain torch: ``q [B, Hq, D]``, ``u [R, Hq, D]`` float32, ``rows [B]`` -> ``[B, Hq, D]`` in q's dtype."""
    d = q.shape[-1]
    qf = q.float()
    e = qf / qf.norm(dim=-1, keepdim=True).clamp_min(1e-6) * math.sqrt(d)
    return (u[rows.long() % u.shape[0]] + sigma * e).to(q.dtype)


def mix_queries(q: torch.Tensor, u: torch.Tensor, rows: torch.Tensor, sigma: float, *,
                impl: str | None = None) -> torch.Tensor:
    """:func:`mix_queries_reference` in one launch (Triton). ``u`` contiguous float32 ``[R, Hq, D]``.
    No host synchronisation (CUDA-graph capturable)."""
    if not use_triton(impl, q, u):
        return mix_queries_reference(q, u, rows, sigma)
    b, hq, d = q.shape
    if u.shape[1:] != (hq, d) or u.dtype != torch.float32 or not u.is_contiguous():
        raise ValueError(f"u must be contiguous float32 [R, {hq}, {d}], got {tuple(u.shape)} {u.dtype}")
    check_head_dim(d)
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    if b:
        _mix_kernel[(b,)](q, u, rows, out, q.stride(0), q.stride(1), out.stride(0), out.stride(1), u.shape[0],
                          float(sigma), HQ=hq, BLOCK_H=next_pow2(hq), D=d, num_warps=4)
    return out
