"""The fused selection's over-fetch correction (Triton on the GPU) against its torch reference, bit for bit
(exact scores: ``tests/overfetch_cases.py``), in the runtime's launch shapes."""

import pytest
import torch

from overfetch_cases import check_score_select_fill


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,head_dim,aggregation,k,fill,max_pages,masked,by_row", [
    (4, 128, "mean", 48, 16, 1024, True, True),  # budget 32 pages + 16 over-fetched, 32K context
    (4, 128, "mean", 48, 16, 4096, True, False),  # 128K: several key chunks in the merge
    (7, 64, "max", 6, 3, 40, False, True),
    (3, 64, "softmax-mean", 10, 4, 300, True, False),  # the unfused path
])
def test_score_select_fill_gpu(dtype, group, head_dim, aggregation, k, fill, max_pages, masked, by_row):
    check_score_select_fill("cuda", dtype, group, head_dim, k=k, fill=fill, aggregation=aggregation, page=32,
                            max_pages=max_pages, masked=masked, by_row=by_row)
    check_score_select_fill("cuda", dtype, group, head_dim, k=k, fill=fill, aggregation=aggregation, page=32,
                            max_pages=max_pages, host_pages=9, seed=1)  # ties


def test_score_select_fill_large_queries_gpu():
    check_score_select_fill("cuda", torch.bfloat16, 4, 128, k=48, fill=16, page=32, max_pages=1024, q_scale=1024.0)
