"""kernels/host_copy.py: per-block copies by address (checked on the CPU with memmove)."""

import ctypes

import pytest
import torch

from freekv_sglang.kernels.host_copy import copy_blocks


def _memmove2d(dst, dpitch, src, spitch, width, height):
    for r in range(height):
        ctypes.memmove(dst + r * dpitch, src + r * spitch, width)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blocks_into_staging_buffer_match_indexing(dtype):
    """The staged recall's use: block j into row j of a contiguous [n, P, D] buffer (head stride 0)."""
    g = torch.Generator().manual_seed(3)
    store = torch.randn((2, 2, 40, 4, 8, 16), generator=g).to(dtype)  # [L, K/V, pages, Hkv, P, D]
    src = store[1, 1]  # a strided view: layer 1, V
    pages = torch.randint(1, 40, (37,), generator=g).tolist()
    heads = torch.randint(0, 4, (37,), generator=g).tolist()
    dst = torch.full((48, 8, 16), float("nan"), dtype=dtype)
    copy_blocks(src, dst[:, :, None, :].expand(-1, -1, 4, -1), pages, heads, range(37), _memmove2d)
    want = torch.stack([src[p, h] for p, h in zip(pages, heads)])
    assert torch.equal(dst[:37], want)
    assert torch.isnan(dst[37:].float()).all()  # nothing beyond the pieces is written


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blocks_into_slots_match_indexing(dtype):
    """The per-page recall's use: straight into the strided rows of NHD working-set slots."""
    g = torch.Generator().manual_seed(4)
    store = torch.randn((2, 2, 30, 3, 8, 16), generator=g).to(dtype)  # [L, K/V, pages, Hkv, P, D]
    src = store[0, 1]
    ws = torch.randn((12, 8, 3, 16), generator=g).to(dtype)  # [slots, P, Hkv, D] (NHD)
    want = ws.clone()
    pages, slots, heads = [5, 17, 29, 1, 5], [0, 3, 11, 7, 3], [2, 0, 1, 1, 2]
    for p, s, h in zip(pages, slots, heads):
        want[s, :, h, :] = src[p, h]
    copy_blocks(src, ws, pages, heads, slots, _memmove2d)
    assert torch.equal(ws, want)


def test_copy_blocks_refuses_bad_layouts():
    src = torch.randn(5, 2, 8, 16)
    with pytest.raises(ValueError, match="contiguous"):
        copy_blocks(src.transpose(2, 3), torch.empty(4, 16, 2, 8), [0], [0], [0], _memmove2d)
    with pytest.raises(ValueError, match="does not take"):
        copy_blocks(src, torch.empty(4, 8, 16, 2).transpose(2, 3), [0], [0], [0], _memmove2d)
    with pytest.raises(ValueError, match="does not take"):
        copy_blocks(src, torch.empty(4, 8, 3, 16), [0], [0], [0], _memmove2d)
    with pytest.raises(ValueError, match="outside"):  # more blocks than staging rows
        copy_blocks(src, torch.empty(1, 8, 2, 16), [0, 1], [0, 1], range(2), _memmove2d)
    with pytest.raises(ValueError, match="outside"):
        copy_blocks(src, torch.empty(4, 8, 2, 16), [5], [0], [0], _memmove2d)
