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


@pytest.mark.parametrize("tuning", [{}, dict(block_n=64, num_warps=2, blocks_per_program=2, num_stages=3, margin=4),
                                    dict(block_n=32, num_warps=4, heads_fast=True, aggregation="max"),
                                    dict(max_pages=300, masked=False, by_row=True)])
def test_score_select_fused_merge_gpu(tuning):
    """One launch (tickets): the last scoring program of each row merges it; the counters it re-arms serve
    the next call (a second selection over other inputs)."""
    tuning = {"max_pages": 4096, **tuning}
    tickets = torch.zeros(16, dtype=torch.int32, device="cuda")
    for seed in (0, 1):
        check_score_select("cuda", torch.bfloat16, 4, 128, k=32, page=32, seed=seed, tickets=tickets, **tuning)


def test_score_select_fused_merge_graph_replays_match_two_launches():
    """Captured in a CUDA graph and replayed, the one-launch selection gives exactly the two-launch result
    (same block keys, same merge) at the runtime's batch-8 Llama shape, many programs per row."""
    from freekv_sglang.kernels.score_select import score_and_select, selection_scratch_size

    g = torch.Generator(device="cuda").manual_seed(3)
    b, hkv, hq, d, page, k, ctx = 8, 8, 32, 128, 32, 32, 32768
    n_pages = ctx // page
    digests = torch.randn((b * n_pages + 1, hkv, 2, d), generator=g, device="cuda").to(torch.bfloat16)
    r2t = (page + torch.arange(b, device="cuda")[:, None] * ctx + torch.arange(ctx, device="cuda")).int()
    rows = torch.arange(b, device="cuda")
    n_ctx = torch.tensor([ctx, ctx - 1000, 20000, 5000, ctx, 9000, 3000, 31000], device="cuda")
    q = torch.randn((b, hq, d), generator=g, device="cuda").to(torch.bfloat16)
    res0 = torch.randint(16, 600, (b, hkv, k), generator=g, device="cuda")
    kw = dict(max_pages=n_pages, page_size=page, n_sink=16, n_window=16, aggregation="mean")
    keys = torch.empty(selection_scratch_size(b, hkv, n_pages, k), dtype=torch.int64, device="cuda")

    def run(resident, tickets=None):
        rs = torch.empty((b, hkv, k), dtype=torch.int32, device="cuda")
        rp = torch.empty_like(rs)
        score_and_select(q, digests, r2t, rows, n_ctx, None, resident, k, rs, rp, keys=keys, tickets=tickets, **kw)
        return rs, rp

    want_res = res0.clone()
    want = run(want_res)
    tickets = torch.zeros(b * hkv, dtype=torch.int32, device="cuda")
    res = res0.clone()
    run(res, tickets)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = run(res, tickets)
    for _ in range(3):
        res.copy_(res0)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(res, want_res)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert int(tickets.count_nonzero()) == 0
