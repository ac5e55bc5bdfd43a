"""XQA's padded block table derived from the working sets' CSR page table (CPU, torch ops)."""

from __future__ import annotations

import pytest
import torch

import freekv_sglang.kernels as K
from freekv_sglang.algorithm import WorkingSetLayout


@pytest.mark.parametrize("lens", [[1, 37, 200, 129], [64], [5, 5, 1000, 31, 2]])
def test_block_table_matches_the_layouts_page_table(lens):
    lay = WorkingSetLayout(page_size=8, n_sink=2, n_select=4, n_window=3)
    S = lay.slots
    seq = torch.tensor(lens)
    rows = torch.randperm(len(lens) + 3)[: len(lens)] + 1
    b = len(lens)
    ip = torch.zeros(b + 1, dtype=torch.int32)
    ix = torch.full((b * S,), -5, dtype=torch.int32)
    lp = torch.zeros(b, dtype=torch.int32)
    K.build_page_table(seq, rows, ip, ix, lp, layout=lay, slot_base=S)
    bt = torch.full((b, S), 99, dtype=torch.int32)
    sl = torch.full((b,), 99, dtype=torch.int32)
    K.block_table_from_page_table(ip, ix, lp, lay.page_size, bt, sl)
    for i, (n, r) in enumerate(zip(lens, rows.tolist())):
        slots, last = lay.page_table(n)
        assert bt[i, : len(slots)].tolist() == [r * S + s for s in slots]
        assert bt[i, len(slots):].eq(0).all()
        assert int(sl[i]) == (len(slots) - 1) * lay.page_size + last


def test_block_table_shapes_are_checked():
    ip = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="does not match"):
        K.block_table_from_page_table(ip, torch.zeros(4, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 8,
                                      torch.zeros(3, 4, dtype=torch.int32), torch.zeros(2, dtype=torch.int32))
