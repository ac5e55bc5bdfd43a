"""Decode attention over the working sets: a GPU kernel on CUDA, the plain-torch reference elsewhere.

One page table serves all layers of a step. The table lives in device buffers that a
graph-recordable kernel fills from the batch's rows and lengths (:meth:`device_buffers`).

Kernels (``FREEKV_DECODE_ATTENTION``):

- ``auto`` (default): ``triton`` where its tiles fit (page size >= 16, a power-of-two head dim
  >= 16, bf16/fp16), else ``flashinfer``;
- ``triton``: the Triton split decode (:mod:`freekv_sglang.kernels.split_decode`), which reads the
  device table directly: no host-side plan, one code path for eager and CUDA-graph steps;
- ``flashinfer``: FlashInfer's paged decode wrapper, whose host-side plan needs the host copies of
  ``indptr`` and ``last_page_len`` (:meth:`plan`); for CUDA graphs each captured batch size gets
  its own wrapper with static buffers, as SGLang's own backend does.
"""

from __future__ import annotations

import logging

import torch

from freekv_sglang.algorithm.attention import paged_attention
from freekv_sglang.settings import env_name

logger = logging.getLogger(__name__)

ATTENTION_ENV = env_name("decode_attention")


def split_decode_unsupported(page_size: int | None, head_dim: int | None, dtype: torch.dtype | None) -> str | None:
    """Why the Triton split decode cannot serve these shapes (``None``: it can; unknown shapes pass)."""
    if page_size is not None and (page_size < 16 or page_size & (page_size - 1)):
        return f"page size {page_size} (its tiles need a power of two >= 16)"
    if head_dim is not None and (head_dim < 16 or head_dim & (head_dim - 1)):
        return f"head dim {head_dim} (its tiles need a power of two >= 16)"
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        return f"working sets in {dtype} (bf16 or fp16 only)"
    return None


def resolve_attention_kernel(requested: str, device: torch.device, page_size: int | None = None,
                             head_dim: int | None = None, dtype: torch.dtype | None = None) -> str:
    """The kernel ``FREEKV_DECODE_ATTENTION=requested`` (``auto``, ``triton`` or ``flashinfer``) runs: ``auto``
    becomes ``triton`` (the fastest over working sets of a few thousand tokens, docs/BENCHMARKS.md) where the
    Triton split decode fits the shapes and Triton imports, else ``flashinfer``. An explicit ``triton`` that
    cannot serve the shapes on CUDA is an error (off CUDA the plain-torch reference runs whatever is asked)."""
    why = split_decode_unsupported(page_size, head_dim, dtype)
    if requested == "triton" and why is not None and device.type == "cuda":
        raise ValueError(f"{ATTENTION_ENV}=triton cannot serve {why}; use {ATTENTION_ENV}=flashinfer")
    if requested != "auto":
        return requested
    if device.type != "cuda":  # the reference runs off CUDA; the name only says what a GPU would run
        return "flashinfer" if why is not None else "triton"
    if why is not None:
        logger.info("%s=auto: FlashInfer's paged decode over the working sets, as the Triton split decode "
                    "cannot serve %s", ATTENTION_ENV, why)
        return "flashinfer"
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.info("%s=auto: FlashInfer's paged decode over the working sets (Triton does not import)",
                    ATTENTION_ENV)
        return "flashinfer"
    return "triton"


class WorkingSetAttention:
    """Paged decode attention with page size ``P`` over working-set slots.

    Args:
        device: torch device; FlashInfer on CUDA, :func:`paged_attention` otherwise.
        max_batch: largest eager batch.
        slots_per_request: ``S``, the page-table capacity per request.
        workspace: FlashInfer float workspace to share (CUDA).
        page_size, head_dim, dtype: the working sets' shapes, for ``auto``'s choice (and to refuse an
            explicit ``triton`` that cannot serve them); ``None``: not checked.
        kernel: ``FREEKV_DECODE_ATTENTION`` (``auto``, ``triton`` or ``flashinfer``).
    """

    def __init__(self, device: torch.device, max_batch: int, slots_per_request: int,
                 workspace: torch.Tensor | None = None, *, page_size: int | None = None,
                 head_dim: int | None = None, dtype: torch.dtype | None = None, kernel: str = "auto"):
        self.device = device
        self.slots = slots_per_request
        self.workspace = workspace
        self.max_batch = max_batch
        self.eager_buffers = (torch.zeros(max_batch + 1, dtype=torch.int32, device=device),
                              torch.zeros(max_batch * slots_per_request, dtype=torch.int32, device=device),
                              torch.ones(max_batch, dtype=torch.int32, device=device))
        self.eager = None
        self.graph_wrappers = {}
        self.kernel = resolve_attention_kernel(kernel, device, page_size, head_dim, dtype)
        self.split = None  # the Triton split decode (kernel "triton", auto's choice where it fits)
        if device.type == "cuda":
            from freekv_sglang.kernels.sparse_decode import SparseDecode

            self._cls = SparseDecode
            self.eager = SparseDecode(device=device, workspace=workspace)
            if self.kernel == "triton":
                from freekv_sglang.kernels.split_decode import SplitDecode

                # its scratch in the FlashInfer wrapper's float workspace, which this choice leaves idle
                self.split = SplitDecode(*self.eager_buffers, slots_per_request, workspace=self.eager.workspace)
                logger.info("working-set attention through the Triton split decode (%s=flashinfer for FlashInfer's "
                            "paged decode)", ATTENTION_ENV)
        self.active = None
        self._tables = None

    @property
    def _planned_on_host(self) -> bool:
        """FlashInfer's paged decode wrapper needs a host-side plan and, for CUDA graphs,
        a wrapper with static buffers per batch size; the split decode reads the eager table."""
        return self.split is None

    @property
    def needs_host_tables(self) -> bool:
        """Whether :meth:`plan` reads the host ``indptr`` / ``last_page_len`` (FlashInfer's wrapper and the
        CPU reference do; the split decode reads the device table, so a step can skip them)."""
        return self.eager is None or self._planned_on_host

    def _graph_wrapper(self, bs: int):
        w = self.graph_wrappers.get(bs)
        if w is None:
            w = self._cls(device=self.device, workspace=self.workspace, use_cuda_graph=True, batch_size=bs,
                          max_slots=self.slots)
            self.graph_wrappers[bs] = w
        return w

    def device_buffers(self, bs: int, graph: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(kv_indptr [bs+1], kv_indices [bs*S], kv_last_page_len [bs])`` int32 device buffers to fill."""
        if graph and self._planned_on_host:
            w = self.graph_wrappers[bs]
            return w.kv_indptr, w.kv_indices, w.kv_last_page_len
        if bs > self.max_batch:
            raise ValueError(f"decode batch {bs} exceeds the working-set capacity of {self.max_batch} requests")
        ip, idx, lpl = self.eager_buffers
        return ip[: bs + 1], idx, lpl[:bs]

    def plan(self, bs: int, indptr_host: torch.Tensor | None, last_page_len_host: torch.Tensor | None, *, graph: bool,
             num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype):
        """Host-side plan of a step (outside CUDA graphs).

        In graph mode the wrapper for ``bs`` is created on first use; its buffers are the ones
        :meth:`device_buffers` returns. In eager mode call :meth:`device_buffers` and fill them
        *before* planning. ``indptr_host`` and ``last_page_len_host`` may be ``None`` where
        :attr:`needs_host_tables` is False.
        """
        if self.needs_host_tables and (indptr_host is None or last_page_len_host is None):
            raise ValueError(f"the {self.kernel} working-set attention plans from the host indptr and last-page "
                             "lengths: pass them")
        if self.eager is None:  # CPU reference: read the filled table now
            ip = indptr_host.tolist()
            idx = self.eager_buffers[1].tolist()
            self._tables = ([idx[ip[b]:ip[b + 1]] for b in range(bs)], last_page_len_host.tolist())
            return
        if not self._planned_on_host:  # the split decode reads the device table: no host plan
            self.active = self.split
            return
        w = self._graph_wrapper(bs) if graph else self.eager
        indices = w.kv_indices if graph else self.eager_buffers[1]
        w.plan(indptr_host, indices, last_page_len_host, num_qo_heads, num_kv_heads, head_dim, page_size,
               dtype, dtype)
        self.active = w

    def __call__(self, q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """``q [B, Hq, D]`` -> ``[B, Hq, D]`` (q's dtype)."""
        if self.eager is not None:
            return self.active.run(q, k_slots, v_slots, scale)
        tables, lens = self._tables
        return paged_attention(q, k_slots, v_slots, tables, lens, scale).to(q.dtype)
