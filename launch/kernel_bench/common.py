"""The benchmarked shape (Llama-3.1-8B: 32 query / 8 KV heads, head dim 128, 32-token pages) and the
kernels under test, importable from a checkout that is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

try:
    import freekv_sglang.kernels as K
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import freekv_sglang.kernels as K
from freekv_sglang.algorithm import WorkingSetLayout  # noqa: E402
from freekv_sglang.kernels import recall as recall_mod  # noqa: E402
from freekv_sglang.kernels.common import sm_count  # noqa: E402

__all__ = ["K", "recall_mod", "sm_count", "MIB", "DEV", "BF16", "HQ", "HKV", "D", "P", "NSEL", "LAYOUT",
           "page_table"]

MIB = 2**20
DEV = torch.device("cuda")
BF16 = torch.bfloat16
# Llama-3.1-8B shape
HQ, HKV, D, P, NSEL = 32, 8, 128, 32, 32
LAYOUT = WorkingSetLayout(P, 16, NSEL, 16)  # 2048 tokens: 16 sink + 32 selected + 16 window pages


def page_table(b: int, ctx: int):
    """``(seq, indptr, indices, last_page_len)`` of ``b`` requests of ``ctx`` tokens over their working sets
    (``seq`` on the host, the table on the GPU), as the runtime builds it."""
    seq = torch.full((b,), ctx, dtype=torch.int32)
    ip = torch.empty(b + 1, dtype=torch.int32, device=DEV)
    ix = torch.empty(b * LAYOUT.slots, dtype=torch.int32, device=DEV)
    lp = torch.empty(b, dtype=torch.int32, device=DEV)
    K.build_page_table(seq.to(DEV), torch.arange(b, device=DEV), ip, ix, lp, layout=LAYOUT, slot_base=LAYOUT.slots)
    return seq, ip, ix, lp
