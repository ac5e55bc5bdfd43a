"""Fused decode kernels (Triton on the GPU) vs their torch references."""

import pytest
import torch

from kernel_cases import check_prologue, check_select_recall


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
