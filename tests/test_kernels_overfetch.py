"""The over-fetch correction of the fused selection (``score_and_select(fill_resident=m)``) in Triton's CPU
interpreter against its torch reference, bit for bit (``tests/overfetch_cases.py``); the unfused path
(``select_update``) and the references against the algorithm. GPU: tests/gpu/test_kernels_overfetch_gpu.py."""

from __future__ import annotations

import pytest
import torch


def test_overfetch_selection_under_interpreter(code_under_interpreter):
    pytest.importorskip("triton")
    code = (
        "import torch\n"
        "from overfetch_cases import check_score_select_fill\n"
        "rec = 0\n"
        "for agg, grp, k, fill, masked, by_row in (('mean', 3, 6, 3, True, False), ('max', 1, 5, 1, False, True),\n"
        "                                          ('mean', 4, 16, 8, True, True),\n"
        "                                          ('mean', 2, 20, 12, False, False)):\n"
        "    rec += check_score_select_fill('cpu', torch.float16, grp, 16, k=k, fill=fill, aggregation=agg,\n"
        "                                   masked=masked, by_row=by_row)\n"
        "assert rec > 0\n"
        "check_score_select_fill('cpu', torch.bfloat16, 2, 32, k=6, fill=2, max_pages=300)  # launch_shape: pipelined\n"
        "check_score_select_fill('cpu', torch.float16, 2, 16, k=6, fill=3, q_scale=1024.0)  # large-magnitude queries\n"
        "for seed in range(3):  # 5 host pages behind 40 logical ones: equal scores everywhere\n"
        "    check_score_select_fill('cpu', torch.float16, 2, 16, k=8, fill=4, host_pages=5, seed=seed)\n"
        "check_score_select_fill('cpu', torch.float16, 3, 16, k=6, fill=3, block_n=16, blocks_per_program=2,\n"
        "                        num_stages=3, heads_fast=True)  # 3 blocks, 2 per program\n"
        "check_score_select_fill('cpu', torch.float16, 2, 16, k=6, fill=3, aggregation='softmax-mean')  # unfused\n"
        "import freekv_sglang.kernels.score_select as ss\n"
        "ss.MERGE_CHUNK_KEYS = 16  # the merge reads the live blocks' keys one block at a time\n"
        "check_score_select_fill('cpu', torch.float16, 2, 16, k=6, fill=3, block_n=16)\n"
        "print('ok')\n"
    )
    code_under_interpreter(code)


def test_overfetch_references():
    """The in-place reference equals the algorithm's corrected selection + residency update; the default
    ``fill_resident=0`` is the plain top-k; the arguments are checked."""
    from freekv_sglang.algorithm.selection import overfetch_select, residency_update
    from freekv_sglang.kernels.score_select import score_and_select, selection_scratch_size
    from freekv_sglang.kernels.select import select_update_reference

    g = torch.Generator().manual_seed(11)
    B, hkv, R, Np, k, m = 3, 2, 5, 20, 6, 2
    scores = torch.randn(B, hkv, Np, generator=g)
    scores[..., :2] = float("-inf")
    resident = torch.stack([torch.randperm(Np - 2, generator=g)[:k] + 2 for _ in range((R + 1) * hkv)])
    resident = resident.view(R + 1, hkv, k)
    rows = torch.tensor([1, 4, 2])
    mask = torch.tensor([[True, False], [True, True], [False, True]])
    rs = torch.empty((B, hkv, k), dtype=torch.int32)
    rp = torch.empty_like(rs)
    before = resident.clone()
    select_update_reference(scores, resident, rows, mask, k, rs, rp, fill_resident=m)
    want = residency_update(before[rows], overfetch_select(scores, before[rows], k - m, m), mask)
    assert torch.equal(resident[rows], want.resident)
    assert torch.equal(rs.long(), want.recall_slot) and torch.equal(rp.long(), want.recall_page)
    assert int(want.n_recall.max()) <= k - m
    extra = selection_scratch_size(4, 8, 1024, 48, fill_resident=16) - selection_scratch_size(4, 8, 1024, 48)
    assert extra == 4 * 8 * 64  # one key per resident slot (48, padded to 64)
    q = torch.zeros(1, 2, 16)
    for bad in (dict(fill_resident=k), dict(fill_resident=-1), dict(fill_resident=1, margin=1)):
        with pytest.raises(ValueError, match="fill_resident"):
            score_and_select(q, torch.zeros(4, 2, 2, 16), torch.zeros(2, 64, dtype=torch.int32), rows[:1],
                             torch.tensor([64]), None, resident, k, rs[:1], rp[:1], max_pages=8, page_size=8, n_sink=1,
                             n_window=2, aggregation="mean", **bad)
