"""Fused decode kernels vs their torch references, with the Triton kernels in the CPU interpreter
(child process: the interpreter is chosen when Triton is imported). GPU: tests/gpu/test_kernels_fused_gpu.py."""

from __future__ import annotations

import pytest


def test_fused_kernels_under_interpreter(code_under_interpreter):
    pytest.importorskip("triton")
    code = (
        "import torch\n"
        "from kernel_cases import check_prologue, check_score_select, check_select_recall\n"
        "for group in (1, 3, 4):\n"
        "    check_prologue('cpu', torch.float16, group, 16)\n"
        "check_select_recall('cpu', torch.float16, 16)\n"
        "check_select_recall('cpu', torch.float16, 32, k=5)\n"
        "for nprog in (1, 2):  # several chunks per program of the persistent recall grid\n"
        "    check_select_recall('cpu', torch.float16, 16, page=4, k=7, num_programs=nprog)\n"
        "for nprog in (1, 3, 4, 64):  # page 32: 4 entries per chunk, 3 chunks per list (the last partial)\n"
        "    check_select_recall('cpu', torch.float16, 16, page=32, k=10, num_programs=nprog)\n"
        "for warps in (1, 2, 16):  # tiles of 16 rows per warp: 1, 1 and 8 pieces of 32 tokens\n"
        "    check_select_recall('cpu', torch.float16, 16, page=32, k=10, num_programs=3, num_warps=warps)\n"
        "for agg, grp, k, masked, by_row in (('mean', 1, 4, True, False), ('max', 3, 5, False, True),\n"
        "                                    ('mean', 4, 16, True, True)):\n"
        "    check_score_select('cpu', torch.float16, grp, 16, k=k, aggregation=agg, masked=masked, by_row=by_row)\n"
        "check_score_select('cpu', torch.bfloat16, 2, 32, k=4, max_pages=300)\n"
        "check_score_select('cpu', torch.float16, 4, 16, k=4, block_n=16, num_warps=2)  # tuning: 3 blocks\n"
        "check_score_select('cpu', torch.float16, 3, 16, k=4, block_n=16, heads_fast=True)  # launch order\n"
        "for bpp, hf in ((2, False), (3, True)):  # 3 blocks: 2 programs (the last block of the 2nd past NB), 1\n"
        "    check_score_select('cpu', torch.float16, 2, 16, k=4, block_n=16, blocks_per_program=bpp, heads_fast=hf,\n"
        "                       num_stages=3, merge_warps=2)\n"
        "check_score_select('cpu', torch.float16, 2, 16, k=4, margin=3, block_n=16, blocks_per_program=2)\n"
        "check_score_select('cpu', torch.float16, 4, 16, k=4, max_pages=300)  # launch_shape: 5 rows x 2 heads\n"
        "check_score_select('cpu', torch.bfloat16, 3, 32, k=4, head_major=True)  # digests through strides\n"
        "check_score_select('cpu', torch.float16, 2, 16, k=4, block_n=16, blocks_per_program=2, head_major=True)\n"
        "import freekv_sglang.kernels.score_select as ss\n"
        "for chunk in (16, 32):  # the merge reads the 3 live blocks' keys in chunks of 1 and 2 blocks\n"
        "    ss.MERGE_CHUNK_KEYS = chunk\n"
        "    check_score_select('cpu', torch.float16, 2, 16, k=4, block_n=16)\n"
        "    check_score_select('cpu', torch.float16, 2, 16, k=4, margin=3, block_n=16, blocks_per_program=2)\n"
        "    check_score_select('cpu', torch.float16, 2, 16, k=4, block_n=16, blocks_per_program=2, masked=False)\n"
        "ss.MERGE_CHUNK_KEYS = 1024\n"
        "for m in (2, 5):  # residency hysteresis: blocks keep k + m keys, residents in the top k + m stay\n"
        "    check_score_select('cpu', torch.float16, 2, 16, k=4, margin=m)\n"
        "    check_score_select('cpu', torch.float16, 2, 16, k=4, margin=m, aggregation='softmax-mean')\n"
        "try:\n"
        "    check_score_select('cpu', torch.float16, 1, 16, k=4, block_n=24)\n"
        "    raise AssertionError('block_n=24 accepted')\n"
        "except ValueError as e:\n"
        "    assert 'block_n=24' in str(e)\n"
        "print('ok')\n"
    )
    code_under_interpreter(code)


def test_fused_references_compose_the_algorithm():
    """The in-place selection reference equals the algorithm's top-k + residency update on the
    gathered rows (the Triton kernel is checked against this reference above and on the GPU)."""
    import torch

    from freekv_sglang.algorithm.selection import residency_update, topk_pages
    from freekv_sglang.kernels.select import select_update_reference

    g = torch.Generator().manual_seed(3)
    B, hkv, R, Np, k = 3, 2, 5, 12, 3
    scores = torch.randn(B, hkv, Np, generator=g)
    resident = torch.full((R + 1, hkv, k), -1, dtype=torch.int64)
    rows = torch.tensor([1, 4, 2])
    mask = torch.tensor([[True, False], [True, True], [False, True]])
    rs = torch.empty((B, hkv, k), dtype=torch.int32)
    rp = torch.empty_like(rs)
    before = resident.clone()
    select_update_reference(scores, resident, rows, mask, k, rs, rp)
    want = residency_update(before[rows], topk_pages(scores, k), mask)
    assert torch.equal(resident[rows], want.resident)
    assert torch.equal(rs.long(), want.recall_slot) and torch.equal(rp.long(), want.recall_page)


def test_selection_launch_shape_and_scratch():
    """The default scoring launch: the pipelined shape where it still fills two programs per SM, the
    one-block shape for small problems; the default scratch holds the keys of either."""
    from freekv_sglang.kernels.common import cdiv
    from freekv_sglang.kernels.score_select import (PIPELINED_SHAPE, block_size, launch_shape,
                                                    selection_scratch_size)

    assert launch_shape(8, 8, 4096, 32, 132) == PIPELINED_SHAPE  # 128K x 8: 2048 programs
    assert launch_shape(8, 8, 1024, 32, 132) == PIPELINED_SHAPE  # 32K x 8: 512 programs
    small = launch_shape(1, 8, 4096, 32, 132)  # 128K x 1: 256 programs < 2 per SM
    assert small == dict(block_n=block_size(4096, 32), num_warps=4, blocks_per_program=1, num_stages=2)
    assert launch_shape(64, 8, 4096, 40, 132)["blocks_per_program"] == 1  # 64 keys per span: block 64 too small
    for b, mp, k in ((8, 4096, 32), (1, 4096, 32), (3, 300, 5), (64, 8192, 32), (16, 2048, 36)):
        for margin in (0, 4):
            sh = launch_shape(b, 8, mp, k + margin, 132)
            kb = max(16, 1 << (k + margin - 1).bit_length())
            need = b * 8 * cdiv(mp, sh["block_n"]) * kb  # keys of every block
            assert selection_scratch_size(b, 8, mp, k, margin=margin) >= need, (b, mp, k, margin, sh)
