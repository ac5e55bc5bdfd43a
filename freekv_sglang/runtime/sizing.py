"""How FreeKV spends memory: host tier capacity and the number of running requests.

With FreeKV, SGLang's token capacity (``max_total_num_tokens``) is the capacity of the
host tier, and GPU memory pays for (a) the digests of every host page (1/P of the KV) and
(b) one working set per running request. The number of running requests is bounded by
what is left for working sets after the digests.
"""

from __future__ import annotations

from dataclasses import dataclass

from freekv_sglang.algorithm.layout import WorkingSetLayout

import torch


@dataclass(frozen=True)
class ModelShape:
    """Attention shape of the (local) model: layers, heads on this rank, head dim, KV dtype."""

    n_layers: int
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def group(self) -> int:
        return self.n_q_heads // self.n_kv_heads


def working_set_bytes_per_row(shape: ModelShape, layout: WorkingSetLayout) -> int:
    """GPU bytes one request row costs: working-set K/V, resident map, previous query."""
    elt = torch.empty(0, dtype=shape.dtype).element_size()
    ws = shape.n_layers * 2 * layout.slots * layout.page_size * shape.n_kv_heads * shape.head_dim * elt
    resident = shape.n_layers * shape.n_kv_heads * layout.n_select * 8
    qprev = shape.n_layers * (shape.n_q_heads * shape.head_dim * elt + shape.n_kv_heads)
    return ws + resident + qprev


def digest_bytes_per_page(shape: ModelShape) -> int:
    """GPU bytes of the digests of one host page (all layers)."""
    elt = torch.empty(0, dtype=shape.dtype).element_size()
    return shape.n_layers * shape.n_kv_heads * 2 * shape.head_dim * elt


def host_bytes_per_page(shape: ModelShape, page_size: int) -> int:
    elt = torch.empty(0, dtype=shape.dtype).element_size()
    return shape.n_layers * 2 * shape.n_kv_heads * page_size * shape.head_dim * elt


class FreeKVMemoryError(RuntimeError):
    """The configuration cannot serve a single request with the memory available."""


@dataclass(frozen=True)
class MemoryPlan:
    host_tokens: int  # SGLang's max_total_num_tokens (page aligned)
    host_pages: int  # incl. padding page 0
    max_running_requests: int
    host_bytes: int
    digest_bytes: int
    working_set_bytes_per_request: int
    gpu_bytes: int  # digests + working sets + score scratch

    def summary(self) -> str:
        gib = 2**30
        return (f"FreeKV memory: host tier {self.host_tokens} tokens ({self.host_bytes / gib:.2f} GiB pinned); "
                f"GPU: digests {self.digest_bytes / gib:.2f} GiB + {self.max_running_requests} working sets x "
                f"{self.working_set_bytes_per_request / 2**20:.1f} MiB = {self.gpu_bytes / gib:.2f} GiB; "
                f"max running requests {self.max_running_requests}")


def scratch_bytes_per_row(shape: ModelShape, layout: WorkingSetLayout, max_context_len: int) -> int:
    """Per-request decode scratch: selection keys of the two selection passes and the
    recall lists (int32 slot + page): per layer for the speculative pass, one set for the compute stream."""
    from freekv_sglang.kernels.score_select import selection_scratch_size

    max_pages = max(1, max_context_len // layout.page_size)
    keys = 2 * selection_scratch_size(1, shape.n_kv_heads, max_pages, layout.n_select) * 8
    lists = 2 * (shape.n_layers + 1) * shape.n_kv_heads * layout.n_select * 4  # per-layer side + main
    return keys + lists


def plan_memory(shape: ModelShape, layout: WorkingSetLayout, host_bytes: int, gpu_bytes: int,
                max_context_len: int, user_max_total_tokens: int | None = None,
                user_max_running_requests: int | None = None) -> MemoryPlan:
    """Split the host and GPU budgets.

    Args:
        host_bytes: pinned host memory the host tier may use.
        gpu_bytes: GPU memory SGLang would have given its KV pool.
        max_context_len: longest context a request may have (score scratch per request).
        user_max_total_tokens / user_max_running_requests: SGLang's caps, if given.
    """
    P = layout.page_size
    per_page_host = host_bytes_per_page(shape, P)
    pages = host_bytes // per_page_host - 1
    if user_max_total_tokens is not None:
        pages = min(pages, user_max_total_tokens // P)
    if pages < 1:
        raise FreeKVMemoryError(f"host memory {host_bytes / 2**30:.2f} GiB holds no KV page "
                                f"({per_page_host} bytes each); raise --freekv-host-memory-gb")
    digest = (pages + 1) * digest_bytes_per_page(shape)
    per_req = working_set_bytes_per_row(shape, layout) + scratch_bytes_per_row(shape, layout, max_context_len)
    left = gpu_bytes - digest - per_req  # row 0 is the padding row
    max_reqs = left // per_req
    if user_max_running_requests is not None:
        max_reqs = min(max_reqs, user_max_running_requests)
    else:
        # Without a user cap, size the rows to the host tier: as many working sets as the host
        # holds working-set-sized histories. Shorter requests queue; the GPU memory not spent on
        # idle working sets stays free for prefill activations.
        max_reqs = min(max_reqs, max(1, pages // layout.slots))
    max_reqs = min(max_reqs, pages)  # each running request owns at least one page
    if max_reqs < 1:
        raise FreeKVMemoryError(
            f"GPU memory for KV ({gpu_bytes / 2**30:.2f} GiB) cannot hold the digests of {pages} host pages "
            f"({digest / 2**30:.2f} GiB) plus one working set ({per_req / 2**20:.1f} MiB); lower "
            f"--freekv-host-memory-gb or the working-set budgets, or raise --mem-fraction-static")
    return MemoryPlan(host_tokens=pages * P, host_pages=pages + 1, max_running_requests=int(max_reqs),
                      host_bytes=(pages + 1) * per_page_host, digest_bytes=digest,
                      working_set_bytes_per_request=per_req, gpu_bytes=digest + (max_reqs + 1) * per_req)
