"""Decode attention over the working sets: FlashInfer on CUDA, the plain-torch reference elsewhere."""

from __future__ import annotations

import torch

from freekv_sglang.algorithm.attention import paged_attention


class WorkingSetAttention:
    """Paged decode attention with page size ``P`` over one page table shared by all layers.

    ``plan`` once per step (outside CUDA graphs), then call the object per layer.
    """

    def __init__(self, device: torch.device, max_batch: int, max_pages_per_req: int, workspace: torch.Tensor | None = None):
        self.device = device
        self.decoder = None
        if device.type == "cuda":
            from freekv_sglang.kernels.sparse_decode import SparseDecode

            self.decoder = SparseDecode(device=device, workspace=workspace)
        self._tables = None

    def plan(self, indptr_host: torch.Tensor, kv_indices: torch.Tensor, last_page_len: torch.Tensor, *,
             num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype):
        """Args: indptr_host int32 ``[B+1]`` (CPU); kv_indices int32 (device); last_page_len int32 ``[B]``."""
        if self.decoder is not None:
            self.decoder.plan(indptr_host, kv_indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
                              page_size, dtype, dtype)
        else:
            ip = indptr_host.tolist()
            idx = kv_indices.tolist()
            self._tables = ([idx[ip[b]:ip[b + 1]] for b in range(len(ip) - 1)], last_page_len.tolist())

    def __call__(self, layer: int, q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """``q [B, Hq, D]`` -> ``[B, Hq, D]`` (q's dtype)."""
        if self.decoder is not None:
            return self.decoder.run(q, k_slots, v_slots, scale)
        tables, lens = self._tables
        return paged_attention(q, k_slots, v_slots, tables, lens, scale).to(q.dtype)
