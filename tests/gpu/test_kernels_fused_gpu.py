"""Fused decode kernels (Triton on the GPU) vs their torch references."""

import pytest
import torch

from kernel_cases import check_prologue, check_score_select, check_select_recall


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 4, 7])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prologue_gpu(dtype, group, head_dim):
    check_prologue("cuda", dtype, group, head_dim, page=32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("k", [4, 32])
def test_select_recall_gpu(dtype, head_dim, k):
    check_select_recall("cuda", dtype, head_dim, page=32, k=k)
    check_select_recall("cuda", dtype, head_dim, page=32, k=k, num_programs=2)  # several chunks per program
    check_select_recall("cuda", dtype, head_dim, page=32, k=k, num_programs=3)  # not a divisor of the chunks
    for warps in (1, 2, 16):  # FREEKV_RECALL_WARPS choices besides the default
        check_select_recall("cuda", dtype, head_dim, page=32, k=k, num_programs=4, num_warps=warps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,head_dim,aggregation,k,max_pages,masked,by_row", [
    (1, 64, "mean", 4, 40, True, False),
    (3, 64, "max", 32, 300, False, True),
    (4, 128, "mean", 32, 4096, True, True),
    (7, 128, "max", 5, 1000, True, False),
])
def test_score_select_gpu(dtype, group, head_dim, aggregation, k, max_pages, masked, by_row):
    check_score_select("cuda", dtype, group, head_dim, k=k, aggregation=aggregation, page=32, max_pages=max_pages,
                       masked=masked, by_row=by_row)


@pytest.mark.parametrize("k,margin,max_pages,aggregation", [(32, 4, 4096, "mean"), (32, 8, 1000, "max"),
                                                           (5, 3, 300, "softmax-mean")])
def test_score_select_keep_margin_gpu(k, margin, max_pages, aggregation):
    """Residency hysteresis: the chosen sets are exactly the reference's sticky selections."""
    check_score_select("cuda", torch.bfloat16, 4, 128, k=k, aggregation=aggregation, page=32, max_pages=max_pages,
                       margin=margin)


@pytest.mark.parametrize("block_n,num_warps,heads_fast,bpp,stages,merge_warps", [
    (32, 2, False, 1, 2, None), (256, 8, False, 1, 2, None), (64, 2, True, 1, 2, 16), (128, 4, True, 1, 2, 4),
    (64, 2, False, 4, 3, None), (64, 4, True, 3, 2, 8), (32, 2, False, 8, 4, None)])
def test_score_select_tuning_gpu(block_n, num_warps, heads_fast, bpp, stages, merge_warps):
    """The scoring program's size, warps, launch order, blocks per program and pipeline stages, and the merge's
    warps (bench_kernels' sweep) do not change the selection."""
    check_score_select("cuda", torch.bfloat16, 4, 128, k=32, page=32, max_pages=1000, block_n=block_n,
                       num_warps=num_warps, heads_fast=heads_fast, blocks_per_program=bpp, num_stages=stages,
                       merge_warps=merge_warps)


@pytest.mark.parametrize("chunk_keys,margin,masked", [(64, 0, True), (256, 4, True), (1024, 0, False)])
def test_score_select_merge_chunks_gpu(monkeypatch, chunk_keys, margin, masked):
    """The merge reads the live blocks' keys in chunks (64 blocks of 64 pages at 4096 pages: 32, 4 and 2
    chunks here) and merges them one after the other: same selection."""
    import freekv_sglang.kernels.score_select as ss

    monkeypatch.setattr(ss, "MERGE_CHUNK_KEYS", chunk_keys)
    check_score_select("cuda", torch.bfloat16, 4, 128, k=32, page=32, max_pages=4096, margin=margin, block_n=64,
                       num_warps=2, blocks_per_program=2, num_stages=3, masked=masked)


@pytest.mark.parametrize("group,head_dim,max_pages,tuning", [
    (4, 128, 4096, {}), (7, 64, 1000, dict(block_n=64, num_warps=2, blocks_per_program=2, num_stages=3))])
def test_score_select_head_major_digests_gpu(group, head_dim, max_pages, tuning):
    """Digests read from a head-major buffer through their strides (bench_kernels' layout experiment)."""
    check_score_select("cuda", torch.bfloat16, group, head_dim, k=32, page=32, max_pages=max_pages, head_major=True,
                       **tuning)
