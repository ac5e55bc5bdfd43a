"""Fidelity rows without a model: mode names, and the FP8 row on random attention inputs (CPU)."""

import math

import pytest
import torch

from freekv_sglang.fidelity.hook import RowDecoder
from freekv_sglang.fidelity.rows import FP8_MAX, build_rows, fp8_roundtrip


def test_fp8_mode_names_and_rows():
    rows = build_rows(["corrected@0.9", "corrected@0.9+fp8", "oracle+fp8"], [64])
    assert [r.label for r in rows] == ["dense", "corrected@0.9/64", "corrected@0.9+fp8/64", "oracle+fp8/64"]
    assert [r.kv_fp8 for r in rows] == [False, False, True, True]
    with pytest.raises(ValueError):
        build_rows(["bogus+fp8"], [64])


def test_keep_margin_mode_names_and_rows():
    rows = build_rows(["corrected@0.9+keep8", "corrected@0.9+fp8+keep4"], [64])
    assert [r.label for r in rows[1:]] == ["corrected@0.9+keep8/64", "corrected@0.9+fp8+keep4/64"]
    assert rows[1].keep_margin == 8 and rows[1].settings().keep_margin == 8 and rows[2].kv_fp8
    with pytest.raises(ValueError, match="suffix"):
        build_rows(["corrected@0.9+keepX"], [64])


def test_overfetch_mode_names_and_rows():
    rows = build_rows(["corrected@0.9+overfetch=64", "speculative+keep2+overfetch=32"], [64])
    assert [r.label for r in rows[1:]] == ["corrected@0.9+overfetch=64/64", "speculative+keep2+overfetch=32/64"]
    lay = rows[1].layout
    assert (lay.n_select, lay.n_overfetch, lay.n_budget) == (4, 2, 2) and rows[1].working_set_tokens == 128 + 128 + 256
    assert rows[1].settings().layout.n_overfetch == 2 and rows[2].settings().keep_margin == 2
    for bad in ("corrected@0.9+overfetch=16", "oracle+overfetch=64", "corrected@0.9+overfetch=x"):
        with pytest.raises(ValueError):
            build_rows([bad], [64])


def test_fp8_roundtrip_saturates_and_keeps_dtype():
    x = torch.tensor([0.1, -3.3, 1000.0, -5e6], dtype=torch.float32)
    y = fp8_roundtrip(x)
    assert y.dtype == torch.float32 and y[2] == FP8_MAX and y[3] == -FP8_MAX
    assert abs(float(y[1]) + 3.3) < 0.25 and float(y[0]) != 0.0


def test_fp8_row_equals_its_twin_fed_fp8_stored_inputs():
    """The +fp8 row is the same FreeKV decode over K/V (prefill keys included) stored in FP8 and read back."""
    g = torch.Generator().manual_seed(0)
    L, hkv, grp, d, n0 = 2, 2, 3, 32, 300
    kw = dict(page_size=16, sink_tokens=16, window_tokens=32)
    fp8 = RowDecoder(build_rows(["corrected@0.9", "corrected@0.9+fp8"], [64], **kw), L, hkv)
    twin = RowDecoder(build_rows(["corrected@0.9"], [64], **kw), L, hkv)
    keys = [torch.randn(1, hkv, n0, d, generator=g) for _ in range(L)]
    vals = [torch.randn(1, hkv, n0, d, generator=g) for _ in range(L)]
    for layer in range(L):
        q0 = torch.randn(1, hkv * grp, n0, d, generator=g)
        fp8.record_prefill(layer, q0, keys[layer])
        twin.record_prefill(layer, q0, fp8_roundtrip(keys[layer]))
    fp8.seed()
    twin.seed()
    differs = False
    for step in range(6):
        for layer in range(L):
            keys[layer] = torch.cat([keys[layer], torch.randn(1, hkv, 1, d, generator=g)], 2)
            vals[layer] = torch.cat([vals[layer], torch.randn(1, hkv, 1, d, generator=g)], 2)
            q = torch.randn(1, hkv * grp, 1, d, generator=g)
            scale = 1 / math.sqrt(d)
            out = fp8.decode(layer, q.expand(3, -1, -1, -1), keys[layer].expand(3, -1, -1, -1),
                             vals[layer].expand(3, -1, -1, -1), scale)
            ref = twin.decode(layer, q.expand(2, -1, -1, -1), fp8_roundtrip(keys[layer]).expand(2, -1, -1, -1),
                              fp8_roundtrip(vals[layer]).expand(2, -1, -1, -1), scale)
            assert torch.equal(out[2], ref[1])  # FreeKV over FP8-stored K/V
            differs |= not torch.equal(out[2], out[1])  # ... is not FreeKV over the original K/V
    assert differs
