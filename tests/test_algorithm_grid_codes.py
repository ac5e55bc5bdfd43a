"""``algorithm.grid_codes`` (plain torch): the packed layout, the quantizer against the ``grid2`` scoring rule
(``scoring_rules.GridCodes``), and the page scores; the kernels' torch paths built on them."""

from __future__ import annotations

import math

import pytest
import torch

from freekv_sglang.algorithm.grid_codes import (dequantize, grid_from_bounds, grid_scores, grid_thresholds,
                                                pack_codes, page_grid_codes, quantize_keys, unpack_codes)
from freekv_sglang.algorithm.scores import aggregate_gqa
from freekv_sglang.algorithm.scoring_rules import GridCodes
from freekv_sglang.kernels.grid_codes import pack_grid_codes, score_pages_grid


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("d", [64, 128])
def test_pack_layout_and_roundtrip(d):
    codes = torch.randint(0, 4, (5, 3, d), generator=_g(0), dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (5, 3, d // 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed), codes)
    # byte j holds channels j, j + D/4, j + D/2, j + 3D/4 at bits 0, 2, 4, 6
    q = d // 4
    j = 5
    want = sum(int(codes[1, 2, j + i * q]) << (2 * i) for i in range(4))
    assert int(packed[1, 2, j]) == want


def test_quantizer_matches_the_grid2_rule():
    """Codes equal ``GridCodes(2).digests`` on the same grid, except for values within float32 rounding of a
    threshold (none in practice); a zero step gives codes 0/3, no NaN."""
    g = _g(1)
    keys = (2 * torch.randn(400, 3, 64, generator=g)).bfloat16()
    rule = GridCodes(2)
    lo_hi = (torch.quantile(keys.float(), 0.005, dim=0), torch.quantile(keys.float(), 0.995, dim=0))
    lo, step = grid_from_bounds(*lo_hi)
    ours = quantize_keys(keys, lo, step)
    theirs = rule.digests(keys, 16, lo_hi)  # [n, Hkv, P, D] float codes
    ours_pages = ours.view(25, 16, 3, 64).permute(0, 2, 1, 3)
    diff = ours_pages.float() != theirs
    assert int(diff.sum()) == 0 or bool((diff.float().mean() < 1e-4))
    assert int(ours.max()) == 3 and int(ours.min()) == 0
    z = quantize_keys(keys, lo, torch.zeros_like(step))
    assert torch.equal(z, torch.where(keys.float() >= lo, 3, 0).to(torch.uint8))
    t1, t2, t3 = grid_thresholds(lo, step)
    assert bool((t1 <= t2).all() and (t2 <= t3).all())
    # levels are the midpoints of the cells
    assert torch.allclose(dequantize(torch.ones_like(ours), lo, step), lo + 1.5 * step)


@pytest.mark.parametrize("grp,d", [(3, 64), (4, 128)])
def test_scores_equal_the_grid2_rule(grp, d):
    g = _g(2)
    b, hkv, p, n = 2, 2, 16, 6
    keys = torch.randn(b, n * p, hkv, d, generator=g).bfloat16()
    q = (8 * torch.randn(b, hkv * grp, d, generator=g)).bfloat16()
    rule = GridCodes(2)
    lo_hi = (torch.quantile(keys[0].float(), 0.005, dim=0), torch.quantile(keys[0].float(), 0.995, dim=0))
    lo, step = grid_from_bounds(*lo_hi)
    packed = torch.stack([page_grid_codes(keys[i], p, lo, step) for i in range(b)])  # [B, Np, Hkv, P, D/4]
    ours = grid_scores(q, packed, lo, step)
    theirs = rule.scores(q, unpack_codes(packed).float(), lo_hi)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    # per-request grids [B, Hkv, D] give the same scores as the broadcast one when equal
    torch.testing.assert_close(grid_scores(q, packed, lo.expand(b, -1, -1), step.expand(b, -1, -1)), ours)


def test_page_codes_drop_the_partial_page():
    keys = torch.randn(2 * 32 + 5, 2, 64, generator=_g(3)).half()
    lo, step = grid_from_bounds(keys.float().amin(0), keys.float().amax(0))
    pc = page_grid_codes(keys, 32, lo, step)
    assert pc.shape == (2, 2, 32, 16)
    assert torch.equal(unpack_codes(pc[1, 1]), quantize_keys(keys[32:64, 1], lo[1], step[1]))


def test_kernel_torch_paths():
    """``pack_grid_codes`` / ``score_pages_grid`` with ``impl="torch"``: the pages of a request row, then its
    scores = the GQA mean of :func:`grid_scores` over the candidates (sink 1, window 1)."""
    g = _g(4)
    p, hkv, grp, d, n_pages = 16, 2, 3, 64, 7
    keys = torch.randn(n_pages * p, hkv, d, generator=g).bfloat16()
    lo, step = grid_from_bounds(keys.float().amin(0)[None], keys.float().amax(0)[None])
    codes = torch.zeros(10, hkv, p, d // 4, dtype=torch.uint8)
    host = torch.tensor([3, 9, 1, 4, 8, 2, 6])  # host page of each logical page
    pack_grid_codes(keys, torch.arange(n_pages) * p, host, codes, lo, step, page_size=p, impl="torch")
    assert torch.equal(codes[host], page_grid_codes(keys, p, lo[0], step[0]))
    r2t = (host[:, None] * p + torch.arange(p)).flatten().int()[None].repeat(2, 1)
    q = torch.randn(1, hkv * grp, d, generator=g).bfloat16()
    out = torch.empty(1, hkv, n_pages)
    score_pages_grid(q, codes, lo, step, r2t, torch.tensor([1]), torch.tensor([n_pages * p]), None, out,
                     page_size=p, n_sink=1, n_window=1, aggregation="mean", impl="torch")
    s = grid_scores(q, codes[host][None], lo, step)
    valid = torch.zeros(1, n_pages, dtype=torch.bool)
    valid[:, 1:n_pages - 1] = True
    torch.testing.assert_close(out, aggregate_gqa(s, hkv, "mean", valid))
    assert math.isinf(float(out[0, 0, 0])) and math.isinf(float(out[0, 1, -1]))
