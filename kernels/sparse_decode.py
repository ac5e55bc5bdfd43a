"""Decode attention over the working sets: a thin wrapper of FlashInfer's paged decode.

Every KV head attends over the same slot list (sink, selected, window); a selected slot
holds a different page for each KV head, which FlashInfer does not need to know. The KV
layout is NHD (``ws_k``, ``ws_v``: ``[n_slots, P, Hkv, D]``), the page size is ``P``, and
``use_tensor_cores=True`` (FlashInfer's prefill kernels) so that any GQA group size works,
3 and 7 included.

CUDA graphs: construct with ``use_cuda_graph=True, batch_size=..., max_slots=...``; the
static buffers ``kv_indptr``, ``kv_indices``, ``kv_last_page_len`` are then attributes,
:func:`.page_table.build_page_table` fills them inside the graph, and :meth:`SparseDecode.plan`
(outside the graph, before each replay) takes the *host* indptr and last-page lengths
(:func:`.page_table.page_table_indptr_host`, :func:`.page_table.last_page_len_host`).
"""

from __future__ import annotations

import math

import torch

from freekv_sglang.algorithm.attention import paged_attention


def sparse_decode_reference(q: torch.Tensor, ws_k: torch.Tensor, ws_v: torch.Tensor, kv_indptr: torch.Tensor,
                            kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """``algorithm.paged_attention`` on FlashInfer's metadata; float32 ``[B, Hq, D]``."""
    ptr = kv_indptr.tolist()
    idx = kv_indices.tolist()
    tables = [idx[ptr[b]:ptr[b + 1]] for b in range(len(ptr) - 1)]
    return paged_attention(q, ws_k, ws_v, tables, kv_last_page_len.tolist(), sm_scale)


class SparseDecode:
    """FlashInfer ``BatchDecodeWithPagedKVCacheWrapper`` (NHD, tensor cores) for working sets.

    Args:
        device: CUDA device.
        workspace: optional uint8 float workspace (FlashInfer recommends 128 MiB; may be
            shared between wrappers that never run concurrently).
        use_cuda_graph: fixed batch size and static metadata buffers.
        batch_size, max_slots: required with ``use_cuda_graph`` (``max_slots`` = slots per
            request, ``layout.slots``): ``kv_indices`` holds ``batch_size * max_slots``.
        backend: FlashInfer backend (``"auto"`` picks FA2 for bf16/fp16).
        use_tensor_cores: FlashInfer's prefill kernels (any GQA group size) instead of its
            decode kernels.
    """

    def __init__(self, device: torch.device | str = "cuda", *, workspace: torch.Tensor | None = None,
                 workspace_bytes: int = 128 * 2**20, use_cuda_graph: bool = False, batch_size: int | None = None,
                 max_slots: int | None = None, backend: str = "auto", use_tensor_cores: bool = True):
        import flashinfer  # lazy: CPU-only users never need it

        self.device = torch.device(device)
        self.workspace = workspace if workspace is not None else torch.zeros(
            workspace_bytes, dtype=torch.uint8, device=self.device)
        self.use_cuda_graph = use_cuda_graph
        self.kv_indptr = self.kv_indices = self.kv_last_page_len = None
        if use_cuda_graph:
            if batch_size is None or max_slots is None:
                raise ValueError("use_cuda_graph needs batch_size and max_slots")
            self.kv_indptr = torch.zeros(batch_size + 1, dtype=torch.int32, device=self.device)
            self.kv_indices = torch.zeros(batch_size * max_slots, dtype=torch.int32, device=self.device)
            self.kv_last_page_len = torch.ones(batch_size, dtype=torch.int32, device=self.device)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=use_cuda_graph, use_tensor_cores=use_tensor_cores,
            paged_kv_indptr_buffer=self.kv_indptr, paged_kv_indices_buffer=self.kv_indices,
            paged_kv_last_page_len_buffer=self.kv_last_page_len, backend=backend,
        )
        self.sm_scale = None
        self.num_qo_heads = self.num_kv_heads = self.head_dim = None

    def plan(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor,
             num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int, q_dtype: torch.dtype,
             kv_dtype: torch.dtype, *, sm_scale: float | None = None, split_pages: int | None = None) -> None:
        """Plan one batch (host side; not capturable).

        Args:
            kv_indptr: int32 ``[B+1]``; pass it on the host (CPU) to avoid a device sync.
            kv_indices: int32 slot ids (GPU); in graph mode pass ``self.kv_indices`` (not copied).
            kv_last_page_len: int32 ``[B]``; host (CPU) preferred, as ``kv_indptr``.
            num_qo_heads, num_kv_heads, head_dim, page_size: shapes (``page_size`` = ``P``).
            q_dtype, kv_dtype: bf16/fp16.
            sm_scale: softmax scale used by :meth:`run` (default ``1/sqrt(head_dim)``).
            split_pages: split every request's pages into chunks of this many pages, each its own
                program, merged afterwards (FlashInfer's ``fixed_split_size``; tensor cores, eager
                wrappers only); ``None`` lets FlashInfer choose.
        """
        if split_pages is not None and split_pages < 1:  # (FlashInfer refuses it without tensor cores)
            raise ValueError(f"split_pages={split_pages}: must be a positive page count")
        if split_pages is not None and self.use_cuda_graph:
            raise ValueError("split_pages with use_cuda_graph: FlashInfer sizes a captured plan for its own split, "
                             "which a fixed split of a larger batch overflows")
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads {num_qo_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.sm_scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(head_dim)
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        if self.use_cuda_graph and kv_indices.data_ptr() == self.kv_indices.data_ptr():
            kv_indices = self.kv_indices[:0]  # already in the static buffer: nothing to copy
        self.wrapper.plan(
            kv_indptr, kv_indices, kv_last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
            q_data_type=q_dtype, kv_data_type=kv_dtype, sm_scale=self.sm_scale,
            **({"fixed_split_size": int(split_pages)} if split_pages is not None else {}),
        )

    def run(self, q: torch.Tensor, ws_k: torch.Tensor, ws_v: torch.Tensor, sm_scale: float | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of ``q`` ``[B, Hq, D]`` over the planned slots of ``ws_k``/``ws_v``
        (``[n_slots, P, Hkv, D]``). Returns ``[B, Hq, D]`` in ``q``'s dtype (into ``out`` if given).
        ``sm_scale`` other than the planned one is applied through FlashInfer's ``q_scale`` (a
        multiplier of the planned scale). Capturable after :meth:`plan`.
        """
        if self.sm_scale is None:
            raise RuntimeError("SparseDecode.run before plan")
        q_scale = None
        if sm_scale is not None and float(sm_scale) != self.sm_scale:
            q_scale = float(sm_scale) / self.sm_scale
        return self.wrapper.run(q, (ws_k, ws_v), q_scale=q_scale, out=out)
