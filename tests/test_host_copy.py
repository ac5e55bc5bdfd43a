"""kernels/host_copy.py: per-block copies by address (checked on the CPU with memmove)."""

import ctypes

import pytest
import torch

from freekv_sglang.kernels.host_copy import PieceCopier


def _memmove(dst, src, n):
    ctypes.memmove(dst, src, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_piece_copier_matches_indexing(dtype):
    g = torch.Generator().manual_seed(3)
    store = torch.randn((2, 2, 40, 4, 8, 16), generator=g).to(dtype)  # [L, K/V, pages, Hkv, P, D]
    src = store[1, 1]  # a strided view: layer 1, V
    pages = torch.randint(1, 40, (37,), generator=g).tolist()
    heads = torch.randint(0, 4, (37,), generator=g).tolist()
    dst = torch.full((48, 8, 16), float("nan"), dtype=dtype)
    PieceCopier.copy(src, dst, pages, heads, _memmove)
    want = torch.stack([src[p, h] for p, h in zip(pages, heads)])
    assert torch.equal(dst[:37], want)
    assert torch.isnan(dst[37:].float()).all()  # nothing beyond the pieces is written


def test_piece_copier_refuses_bad_layouts():
    src = torch.randn(5, 2, 8, 16)
    with pytest.raises(ValueError, match="contiguous"):
        PieceCopier.copy(src.transpose(2, 3), torch.empty(4, 16, 8), [0], [0], _memmove)
    with pytest.raises(ValueError, match="staging buffer must be contiguous"):
        PieceCopier.copy(src, torch.empty(8, 16, 4).permute(2, 0, 1), [0], [0], _memmove)
    with pytest.raises(ValueError, match="do not fit"):
        PieceCopier.copy(src, torch.empty(1, 8, 16), [0, 1], [0, 1], _memmove)


def _memmove2d(dst, dpitch, src, spitch, width, height):
    for r in range(height):
        ctypes.memmove(dst + r * dpitch, src + r * spitch, width)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_copy_to_slots_matches_indexing(dtype):
    g = torch.Generator().manual_seed(4)
    store = torch.randn((2, 2, 30, 3, 8, 16), generator=g).to(dtype)  # [L, K/V, pages, Hkv, P, D]
    src = store[0, 1]
    ws = torch.randn((12, 8, 3, 16), generator=g).to(dtype)  # [slots, P, Hkv, D] (NHD)
    want = ws.clone()
    pages, slots, heads = [5, 17, 29, 1, 5], [0, 3, 11, 7, 3], [2, 0, 1, 1, 2]
    for p, s, h in zip(pages, slots, heads):
        want[s, :, h, :] = src[p, h]
    PieceCopier.copy_to_slots(src, ws, pages, slots, heads, _memmove2d)
    assert torch.equal(ws, want)
