"""Benchmark-only synthetic decode queries in one launch (``FREEKV_BENCH_QUERY_COSINE``).

``out[b, h] = u[rows[b] % R, h] + sigma * sqrt(D) * q[b, h] / max(|q[b, h]|, 1e-6)`` with ``u`` the
layer's fixed directions ``[R, Hq, D]`` (float32): consecutive queries of a head then have cosine
about ``1 / (1 + sigma^2)`` (see :mod:`freekv_sglang.runtime.synthetic`). The reference is the
torch expression; the kernel does it per request in one program, so that the benchmark's locality
setting costs one launch per layer instead of about eight small torch kernels, which FreeKV's
timed step would otherwise carry and dense attention would not.
"""

from __future__ import annotations

import functools
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


# -------------------------------------------------------------------------------------------------
# Calibrated locality (``FREEKV_BENCH_LOCALITY``): each step's query is built from the previous one
# at a drawn angle. The spec is :func:`calibrated_queries_reference`; see
# :mod:`freekv_sglang.runtime.synthetic` for what the tables mean and how they are calibrated.

#: Quantile points of a similarity table (percentiles 0..100).
N_QUANTILES = 101
_MASK32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay below 2**63 (no int64 overflow anywhere)
_NOISE_SALT = 0x2545F491


def n_decoys(group: int) -> int:
    """Decoy query heads per KV head: none without GQA, else one per three query heads (at least one), so that
    low group similarities stay reachable while most heads rank pages."""
    return 0 if group <= 1 else max(1, group // 3)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Integer hash of int64 values in ``[0, 2**32)`` (the kernels compute the same bits)."""
    x = (((x >> 16) ^ x) * _HASH_MUL) & _MASK32
    x = (((x >> 16) ^ x) * _HASH_MUL) & _MASK32
    return (x >> 16) ^ x


def draw_key(seed: int, layer: int, rows: torch.Tensor, head: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Hash of (seed, layer, request row, head, position): int64 in ``[0, 2**32)``, broadcast over the tensors."""
    h = _hash32(torch.as_tensor(seed & _MASK32, dtype=torch.int64))
    h = _hash32(h ^ (layer & _MASK32))
    h = _hash32(h ^ (rows.long() & _MASK32))
    h = _hash32(h ^ (head.long() & _MASK32))
    return _hash32(h ^ (n.long() & _MASK32))


def calibrated_queries_reference(q: torch.Tensor, q_prev: torch.Tensor, u: torch.Tensor, noise: torch.Tensor,
                                 quant: torch.Tensor, kappa: torch.Tensor, rows: torch.Tensor, n: torch.Tensor, *,
                                 layer: int, seed: int, group: int, bin0: float, decoy: float,
                                 pull: float) -> torch.Tensor:
    """Plain torch spec of the calibrated synthetic queries of one layer.

    Args:
        q: ``[B, Hq, D]`` the model's queries (only their shape and dtype are used).
        q_prev: ``[R', Hq, D]`` the runtime's previous query of every request row (zeros: none yet).
        u: float32 ``[R, Hq, D]`` anchor directions (norm ``sqrt(D)``), row ``r`` uses ``u[r % R]``.
        noise: float32 ``[M, D]`` Gaussian vectors, picked by a hash.
        quant: float32 ``[Hkv, 101]`` percentiles 0..100 of the check similarity of this layer's KV heads.
        kappa: float32 ``[Hkv, NB]`` ranking-step factor at contexts ``2 ** (bin0 + i)``.
        rows, n: int ``[B]`` request rows and history lengths (the new token included).
        group: query heads per KV head ``G``; when ``G > 1`` the last :func:`n_decoys` ``(G)`` heads of each group
            are *decoys* (norm ``decoy * sqrt(D)``).
    Returns:
        ``[B, Hq, D]`` in q's dtype. Per (request, KV head) a uniform draw ``x`` (hash of seed, layer, row, KV
        head, n) gives the similarity ``s`` = the table's quantile at ``x``; the other query heads step from
        their previous query by ``cos = 1 - kappa * (1 - s)``, the decoys by the cosine that makes the group's
        mean ``s`` (clamped to [-1, 1]: a group mean below ``((G - m) * cos - m) / G`` for ``m`` decoys is
        realised at that floor). Each step's direction is a hashed noise vector pulled towards the
        anchor, orthogonalised against the previous query.
    """
    b, hq, d = q.shape
    dev = q.device
    rows = rows.long()
    n = n.long()
    heads = torch.arange(hq, device=dev)
    kv = heads // group  # [Hq]
    prev = q_prev[rows].float()  # [B, Hq, D]
    anchor = u[rows % u.shape[0]].float()
    pn = prev.norm(dim=-1, keepdim=True)
    has_prev = pn > 1e-12
    p_hat = torch.where(has_prev, prev / pn.clamp_min(1e-30), anchor / anchor.norm(dim=-1, keepdim=True).clamp_min(1e-30))
    u_hat = anchor / anchor.norm(dim=-1, keepdim=True).clamp_min(1e-30)

    x = draw_key(seed, layer, rows[:, None], kv[None, :], n[:, None])  # [B, Hq] (same within a group)
    pos = ((x >> 8).float() + 0.5) * (100.0 / 16777216.0)  # in (0, 100)
    i0 = pos.floor().long().clamp(max=N_QUANTILES - 2)
    f = pos - i0.float()
    t0 = quant[kv[None, :].expand(b, -1), i0]
    t1 = quant[kv[None, :].expand(b, -1), i0 + 1]
    sim = t0 + f * (t1 - t0)

    nb = kappa.shape[1]
    lb = (torch.log2(n.float().clamp_min(1.0)) - bin0).clamp(0.0, float(nb - 1))[:, None]  # [B, 1]
    j0 = lb.floor().long().clamp(max=max(nb - 2, 0))
    g = (lb - j0.float()).clamp(0.0, 1.0)
    j1 = (j0 + 1).clamp(max=nb - 1)
    k0 = kappa[kv[None, :].expand(b, -1), j0.expand(-1, hq)]
    k1 = kappa[kv[None, :].expand(b, -1), j1.expand(-1, hq)]
    kap = k0 + g * (k1 - k0)

    c_rank = (1.0 - kap * (1.0 - sim)).clamp(-1.0, 1.0)
    if group > 1:
        nd = n_decoys(group)
        is_decoy = (heads % group >= group - nd)[None, :]
        c_dec = ((group * sim - (group - nd) * c_rank) / nd).clamp(-1.0, 1.0)
        c = torch.where(is_decoy, c_dec, c_rank)
        scale = torch.where(is_decoy, torch.full_like(c, decoy), torch.ones_like(c))
    else:
        c, scale = c_rank, torch.ones_like(c_rank)

    y = draw_key(seed ^ _NOISE_SALT, layer, rows[:, None], heads[None, :], n[:, None]) % noise.shape[0]
    w = noise[y].float() + pull * math.sqrt(d) * (u_hat - p_hat)
    w = w - (w * p_hat).sum(-1, keepdim=True) * p_hat
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    out = c[..., None] * p_hat + (1.0 - c * c).clamp_min(0.0).sqrt()[..., None] * w
    return (out * (math.sqrt(d) * scale)[..., None]).to(q.dtype)


if triton is not None:

    @triton.jit
    def _hash32_tl(x):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
        return (x >> 16) ^ x

    @triton.jit
    def _calibrated_kernel(prev_ptr, u_ptr, noise_ptr, quant_ptr, kappa_ptr, rows_ptr, n_ptr, out_ptr,
                           stride_pr, stride_ph, stride_ob, stride_oh, n_slots, n_noise, n_bins, seed_layer,
                           seed_noise_layer, bin0, decoy, pull, HQ: tl.constexpr, BLOCK_H: tl.constexpr,
                           D: tl.constexpr, G: tl.constexpr, ND: tl.constexpr, NQ: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, D)
        hmask = h < HQ
        hm = hmask[:, None] & (d[None, :] >= 0)
        row = tl.load(rows_ptr + b).to(tl.int64)
        n = tl.load(n_ptr + b).to(tl.int64)
        prev = tl.load(prev_ptr + row * stride_pr + h[:, None] * stride_ph + d[None, :], mask=hm,
                       other=0.0).to(tl.float32)
        slot = row % n_slots
        anchor = tl.load(u_ptr + (slot * HQ + h[:, None]) * D + d[None, :], mask=hm, other=0.0)
        an = tl.sqrt(tl.sum(anchor * anchor, axis=1))
        u_hat = anchor / tl.maximum(an, 1e-30)[:, None]
        pn = tl.sqrt(tl.sum(prev * prev, axis=1))
        p_hat = tl.where((pn > 1e-12)[:, None], prev / tl.maximum(pn, 1e-30)[:, None], u_hat)

        kv = (h // G).to(tl.int64)
        hrow = _hash32_tl(seed_layer ^ (row & 0xFFFFFFFF))  # seed_layer: hash(hash(seed) ^ layer)
        x = _hash32_tl(_hash32_tl(hrow ^ kv) ^ (n & 0xFFFFFFFF))
        pos = ((x >> 8).to(tl.float32) + 0.5) * (100.0 / 16777216.0)
        i0 = tl.minimum(tl.floor(pos).to(tl.int32), NQ - 2)
        f = pos - i0.to(tl.float32)
        t0 = tl.load(quant_ptr + kv * NQ + i0, mask=hmask, other=1.0)
        t1 = tl.load(quant_ptr + kv * NQ + i0 + 1, mask=hmask, other=1.0)
        sim = t0 + f * (t1 - t0)

        lb = tl.log2(tl.maximum(n.to(tl.float32), 1.0)) - bin0
        lb = tl.minimum(tl.maximum(lb, 0.0), (n_bins - 1).to(tl.float32))
        j0 = tl.minimum(tl.floor(lb).to(tl.int32), tl.maximum(n_bins - 2, 0))
        g = tl.minimum(tl.maximum(lb - j0.to(tl.float32), 0.0), 1.0)
        j1 = tl.minimum(j0 + 1, n_bins - 1)
        k0 = tl.load(kappa_ptr + kv * n_bins + j0, mask=hmask, other=0.0)
        k1 = tl.load(kappa_ptr + kv * n_bins + j1, mask=hmask, other=0.0)
        kap = k0 + g * (k1 - k0)

        c_rank = tl.minimum(tl.maximum(1.0 - kap * (1.0 - sim), -1.0), 1.0)
        if G > 1:
            is_decoy = (h % G) >= (G - ND)
            c_dec = tl.minimum(tl.maximum((G * sim - (G - ND) * c_rank) / ND, -1.0), 1.0)
            c = tl.where(is_decoy, c_dec, c_rank)
            scale = tl.where(is_decoy, decoy, 1.0)
        else:
            c = c_rank
            scale = tl.full([BLOCK_H], 1.0, tl.float32)

        hn = _hash32_tl(seed_noise_layer ^ (row & 0xFFFFFFFF))
        y = _hash32_tl(_hash32_tl(hn ^ h.to(tl.int64)) ^ (n & 0xFFFFFFFF)) % n_noise
        z = tl.load(noise_ptr + y[:, None] * D + d[None, :], mask=hm, other=0.0)
        w = z + (pull * tl.sqrt(D * 1.0)) * (u_hat - p_hat)
        w = w - tl.sum(w * p_hat, axis=1)[:, None] * p_hat
        w = w / tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), 1e-30)[:, None]
        s = tl.sqrt(tl.maximum(1.0 - c * c, 0.0))
        out = (c[:, None] * p_hat + s[:, None] * w) * (tl.sqrt(D * 1.0) * scale)[:, None]
        tl.store(out_ptr + b * stride_ob + h[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=hm)


def _hash32_int(x: int) -> int:
    x = (((x >> 16) ^ x) * _HASH_MUL) & _MASK32
    x = (((x >> 16) ^ x) * _HASH_MUL) & _MASK32
    return (x >> 16) ^ x


@functools.lru_cache(maxsize=None)
def _layer_seeds(seed: int, layer: int) -> tuple[int, int]:
    """The first two links of :func:`draw_key`'s chain for the similarity and the noise draws (host integers)."""
    return (_hash32_int(_hash32_int(seed & _MASK32) ^ (layer & _MASK32)),
            _hash32_int(_hash32_int((seed ^ _NOISE_SALT) & _MASK32) ^ (layer & _MASK32)))


def calibrated_queries(q: torch.Tensor, q_prev: torch.Tensor, u: torch.Tensor, noise: torch.Tensor,
                       quant: torch.Tensor, kappa: torch.Tensor, rows: torch.Tensor, n: torch.Tensor, *, layer: int,
                       seed: int, group: int, bin0: float, decoy: float, pull: float,
                       impl: str | None = None) -> torch.Tensor:
    """:func:`calibrated_queries_reference` in one launch (Triton); no host synchronisation (CUDA-graph safe).
    ``u``, ``noise``, ``quant``, ``kappa`` contiguous float32; ``q_prev`` ``[R', Hq, D]`` with unit stride in D."""
    kw = dict(layer=layer, seed=seed, group=group, bin0=bin0, decoy=decoy, pull=pull)
    if not use_triton(impl, q, q_prev, u):
        return calibrated_queries_reference(q, q_prev, u, noise, quant, kappa, rows, n, **kw)
    b, hq, d = q.shape
    for name, t in (("u", u), ("noise", noise), ("quant", quant), ("kappa", kappa)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous float32, got {t.dtype}")
    if quant.shape[1] != N_QUANTILES or quant.shape[0] * group != hq or kappa.shape[0] != quant.shape[0]:
        raise ValueError(f"quant [Hkv, {N_QUANTILES}] and kappa [Hkv, NB] with Hkv * {group} = {hq} query heads; got "
                         f"{tuple(quant.shape)}, {tuple(kappa.shape)}")
    check_head_dim(d)
    if q_prev.stride(2) != 1:
        raise ValueError("q_prev must have unit stride in the head dim")
    out = torch.empty_like(q)
    seed_layer, seed_noise = _layer_seeds(seed, layer)
    if b:
        _calibrated_kernel[(b,)](q_prev, u, noise, quant, kappa, rows, n, out, q_prev.stride(0), q_prev.stride(1),
                                 out.stride(0), out.stride(1), u.shape[0], noise.shape[0], kappa.shape[1], seed_layer,
                                 seed_noise, float(bin0), float(decoy), float(pull), HQ=hq, BLOCK_H=next_pow2(hq),
                                 D=d, G=group, ND=n_decoys(group), NQ=N_QUANTILES)
    return out
