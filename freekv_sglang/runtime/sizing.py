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


def shape_from_hf_config(cfg: dict, dtype: torch.dtype = torch.bfloat16) -> ModelShape:
    """Attention shape of a Hugging Face ``config.json`` (one GPU; ``text_config`` of multimodal models)."""
    cfg = cfg.get("text_config", cfg)
    hq = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // hq
    return ModelShape(cfg["num_hidden_layers"], hq, cfg.get("num_key_value_heads", hq), d, dtype)


def working_set_bytes_per_row(shape: ModelShape, layout: WorkingSetLayout, page_scoring: str = "quest") -> int:
    """GPU bytes one request row costs: working-set K/V, resident map, previous query (over-fetched pages
    included: ``layout.n_select`` counts them); with ``page_scoring="grid2"`` also its grids (``lo`` and ``step``
    float32 per layer, KV head and channel)."""
    elt = torch.empty(0, dtype=shape.dtype).element_size()
    ws = shape.n_layers * 2 * layout.slots * layout.page_size * shape.n_kv_heads * shape.head_dim * elt
    resident = shape.n_layers * shape.n_kv_heads * layout.n_select * 8
    qprev = shape.n_layers * (shape.n_q_heads * shape.head_dim * elt + shape.n_kv_heads)
    grid = shape.n_layers * shape.n_kv_heads * shape.head_dim * 2 * 4 if page_scoring == "grid2" else 0
    return ws + resident + qprev + grid


def digest_bytes_per_page(shape: ModelShape, page_scoring: str = "quest", page_size: int | None = None) -> int:
    """GPU bytes of the digests of one host page (all layers): Quest's channel max and min in the model's dtype,
    or with ``page_scoring="grid2"`` the page's 2-bit grid codes, ``page_size * D / 4`` bytes per layer and KV head
    (twice Quest's bf16 digest at ``D = 128``, ``P = 32``)."""
    if page_scoring == "grid2":
        if page_size is None:
            raise ValueError("grid2 codes take page_size * head_dim / 4 bytes: pass page_size")
        return shape.n_layers * shape.n_kv_heads * page_size * shape.head_dim // 4
    elt = torch.empty(0, dtype=shape.dtype).element_size()
    return shape.n_layers * shape.n_kv_heads * 2 * shape.head_dim * elt


def host_bytes_per_page(shape: ModelShape, page_size: int, kv_fp8: bool = False) -> int:
    """Bytes of one page of the full KV (all layers, K and V): the model's dtype, or 1 byte with FP8 tiers."""
    elt = 1 if kv_fp8 else torch.empty(0, dtype=shape.dtype).element_size()
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
    gpu_bytes: int  # digests + working sets + score scratch (+ the GPU tier)
    gpu_tier_pages: int = 0  # full-KV pages in GPU memory, numbered after the host tier's
    gpu_tier_bytes: int = 0
    gpu_tier_tokens: int = 0
    prefix_pages: int = 0  # pages per buffer of the prefix staging area (radix cache, chunked prefill)
    prefix_bytes: int = 0

    @property
    def total_tokens(self) -> int:
        """Token slots of both tiers: SGLang's ``max_total_num_tokens``."""
        return self.host_tokens + self.gpu_tier_tokens

    def summary(self) -> str:
        gib = 2**30
        tier = (f"; GPU tier {self.gpu_tier_pages} pages ({self.gpu_tier_bytes / gib:.2f} GiB), "
                f"{self.total_tokens} tokens in all" if self.gpu_tier_pages else "")
        staging = (f" + prefix staging 2 x {self.prefix_pages} pages ({self.prefix_bytes / 2**20:.0f} MiB)"
                   if self.prefix_pages else "")
        return (f"FreeKV memory: host tier {self.host_tokens} tokens ({self.host_bytes / gib:.2f} GiB pinned){tier}; "
                f"GPU: digests {self.digest_bytes / gib:.2f} GiB{staging} + {self.max_running_requests} working sets x "
                f"{self.working_set_bytes_per_request / 2**20:.1f} MiB = {self.gpu_bytes / gib:.2f} GiB; "
                f"max running requests {self.max_running_requests}")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def digest_warning(plan: MemoryPlan, gpu_bytes: int, page_size: int) -> str | None:
    """A hint when the host tier's digests take most of the GPU pool.

    Digests are kept on the GPU for every host page, so a host tier far larger than the running
    requests' KV takes GPU memory from working sets: fewer requests run at once than a smaller tier
    would allow. Returns ``None`` when digests take at most half of ``gpu_bytes``.
    """
    if plan.digest_bytes * 2 <= gpu_bytes:
        return None
    per_req = plan.working_set_bytes_per_request
    # context length at which the host tier and the working sets fill up together
    balanced = plan.host_tokens // max(1, plan.max_running_requests)
    return (f"FreeKV: digests of the {_size(plan.host_bytes)} host tier take {_size(plan.digest_bytes)} of "
            f"{_size(gpu_bytes)} GPU memory, leaving working sets ({_size(per_req)} each) for "
            f"{plan.max_running_requests} running requests; the host tier fills with them only at contexts of about "
            f"{balanced - balanced % page_size} tokens. For shorter requests a smaller --freekv-host-memory-gb "
            f"lets more run at once (launch/capacity_plan.py projects it).")


def gpu_tier_note(plan: MemoryPlan, gpu_bytes: int, page_size: int) -> str | None:
    """With a GPU tier: the context length at which tiers and working sets fill together, or None.

    The GPU tier and the working sets share one GPU budget. Requests shorter than the balance point
    queue for working sets while part of the tier stays empty (a smaller tier runs more of them at
    once); longer ones fill the tiers first.
    """
    if not plan.gpu_tier_pages:
        return None
    balanced = plan.total_tokens // max(1, plan.max_running_requests)
    balanced -= balanced % page_size
    return (f"FreeKV: the host and GPU tiers hold {plan.total_tokens} tokens and the working sets left beside the "
            f"{_size(plan.gpu_tier_bytes)} GPU tier allow {plan.max_running_requests} running requests: the two fill "
            f"together at about {balanced} tokens per request. Shorter requests queue for working sets while part "
            f"of the tier stays empty; `python launch/capacity_plan.py --model MODEL --gpu-kv-gb {gpu_bytes / 2**30:.1f} "
            f"--host-gb {plan.host_bytes / 2**30:.0f} --context C` gives the tier size that runs the most requests "
            f"of C tokens.")


def capacity_warning(plan: MemoryPlan, gpu_bytes: int, shape: ModelShape) -> str | None:
    """A hint when FreeKV holds fewer tokens than SGLang's own GPU pool would.

    FreeKV keeps every request's whole KV in the host tier, so the tokens it can hold are the host
    tier's; SGLang without FreeKV would give ``gpu_bytes`` to a dense pool. When the host tier is the
    smaller of the two, fewer long requests fit at once than with dense attention. Returns ``None``
    otherwise.
    """
    dense_tokens = gpu_bytes // kv_bytes_per_token(shape)
    if plan.total_tokens >= dense_tokens:
        return None
    held = (f"the host tier holds {plan.host_tokens} tokens ({_size(plan.host_bytes)})" if not plan.gpu_tier_pages
            else f"the host tier and the GPU tier hold {plan.total_tokens} tokens "
                 f"({_size(plan.host_bytes)} + {_size(plan.gpu_tier_bytes)})")
    return (f"FreeKV: {held}, fewer than the "
            f"{dense_tokens} tokens SGLang's GPU KV pool holds without FreeKV ({_size(gpu_bytes)}): fewer long "
            f"requests fit at once than with dense attention. More host memory (--freekv-host-memory-gb) or a "
            f"GPU tier for the GPU memory the working sets leave (--freekv-gpu-tier-gb) fits more; "
            f"launch/capacity_plan.py projects it.")


def scratch_bytes_per_row(shape: ModelShape, layout: WorkingSetLayout, max_context_len: int) -> int:
    """Per-request decode scratch: selection keys of the two selection passes and the
    recall lists (int32 slot + page): per layer for the speculative pass, one set for the compute stream."""
    from freekv_sglang.kernels.score_select import selection_scratch_size

    max_pages = max(1, max_context_len // layout.page_size)
    keys = 2 * max(selection_scratch_size(1, shape.n_kv_heads, max_pages, layout.n_select),
                   selection_scratch_size(1, shape.n_kv_heads, max_pages, layout.n_select,
                                          fill_resident=layout.n_overfetch)) * 8
    lists = 2 * (shape.n_layers + 1) * shape.n_kv_heads * layout.n_select * 4  # per-layer side + main
    return keys + lists


def config_layout(cfg) -> WorkingSetLayout:
    """The working-set layout of a :class:`~freekv_sglang.config.FreeKVConfig` (its page, sink, selected, window
    and over-fetch tokens)."""
    return WorkingSetLayout.from_tokens(cfg.page_size, cfg.sink_tokens, cfg.select_tokens, cfg.window_tokens,
                                        cfg.overfetch_tokens)


def plan_for_config(cfg, shape: ModelShape, host_bytes: int, gpu_bytes: int, max_context_len: int,
                    user_max_total_tokens: int | None = None, user_max_running_requests: int | None = None,
                    prefix_tokens: int = 0) -> "MemoryPlan":
    """:func:`plan_memory` with the layout, GPU tier, tier dtype and page scoring of the config ``cfg``."""
    return plan_memory(shape, config_layout(cfg), host_bytes, gpu_bytes, max_context_len, user_max_total_tokens,
                       user_max_running_requests, gpu_tier_bytes=int(cfg.gpu_tier_gb * 2**30),
                       kv_fp8=cfg.kv_storage == "fp8_e4m3", prefix_tokens=prefix_tokens,
                       page_scoring=cfg.page_scoring)


def plan_memory(shape: ModelShape, layout: WorkingSetLayout, host_bytes: int, gpu_bytes: int,
                max_context_len: int, user_max_total_tokens: int | None = None,
                user_max_running_requests: int | None = None, gpu_tier_bytes: int = 0,
                kv_fp8: bool = False, prefix_tokens: int = 0, page_scoring: str = "quest") -> MemoryPlan:
    """Split the host and GPU budgets.

    Args:
        host_bytes: pinned host memory the host tier may use.
        gpu_bytes: GPU memory SGLang would have given its KV pool.
        max_context_len: longest context a request may have (score scratch per request).
        user_max_total_tokens / user_max_running_requests: SGLang's caps, if given.
        gpu_tier_bytes: GPU memory for full-KV pages beyond the host tier (``--freekv-gpu-tier-gb``),
            taken from ``gpu_bytes`` together with their digests.
        kv_fp8: the tiers hold FP8 K/V (``--freekv-kv-storage fp8_e4m3``): a page takes half the bytes of bf16.
        prefix_tokens: tokens per buffer of the staging area for prefill over cached prefixes (0: none);
            two buffers of K and V, in the model's dtype (:class:`~.prefix.PrefixAttention`).
        page_scoring: ``quest`` or ``grid2`` (digests are then grid codes, and every row has its grids).
    """
    P = layout.page_size
    per_page_host = host_bytes_per_page(shape, P, kv_fp8)
    pages = host_bytes // per_page_host - 1
    if user_max_total_tokens is not None:
        pages = min(pages, user_max_total_tokens // P)
    if pages < 1:
        raise FreeKVMemoryError(f"host memory {host_bytes / 2**30:.2f} GiB holds no KV page "
                                f"({per_page_host} bytes each); raise --freekv-host-memory-gb")
    gpu_pages = max(0, gpu_tier_bytes // per_page_host)
    if user_max_total_tokens is not None:
        gpu_pages = min(gpu_pages, max(0, user_max_total_tokens // P - pages))
    tier = gpu_pages * per_page_host
    digest = (pages + 1 + gpu_pages) * digest_bytes_per_page(shape, page_scoring, P)
    per_req = (working_set_bytes_per_row(shape, layout, page_scoring)
               + scratch_bytes_per_row(shape, layout, max_context_len))
    prefix_pages = -(-prefix_tokens // P)
    staging = 2 * prefix_pages * host_bytes_per_page(shape, P) // shape.n_layers  # one layer, K and V, x2 buffers
    left = gpu_bytes - tier - digest - staging - per_req  # row 0 is the padding row
    max_reqs = left // per_req
    if user_max_running_requests is not None:
        max_reqs = min(max_reqs, user_max_running_requests)
    else:
        # Without a user cap, size the rows to the host tier: as many working sets as the host
        # holds working-set-sized histories. Shorter requests queue; the GPU memory not spent on
        # idle working sets stays free for prefill activations.
        max_reqs = min(max_reqs, max(1, (pages + gpu_pages) // layout.slots))
    max_reqs = min(max_reqs, pages + gpu_pages)  # each running request owns at least one page
    if max_reqs < 1:
        with_tier = f" and a {tier / 2**30:.2f} GiB GPU tier" if tier else ""
        raise FreeKVMemoryError(
            f"GPU memory for KV ({gpu_bytes / 2**30:.2f} GiB) cannot hold the digests of {pages + gpu_pages} pages "
            f"({digest / 2**30:.2f} GiB){with_tier} plus one working set ({per_req / 2**20:.1f} MiB); lower "
            f"--freekv-host-memory-gb{', --freekv-gpu-tier-gb' if tier else ''} or the working set "
            f"(--freekv-select-tokens, --freekv-sink-tokens, --freekv-window-tokens), or raise --mem-fraction-static")
    return MemoryPlan(host_tokens=pages * P, host_pages=pages + 1, max_running_requests=int(max_reqs),
                      host_bytes=(pages + 1) * per_page_host, digest_bytes=digest,
                      working_set_bytes_per_request=per_req,
                      gpu_bytes=tier + digest + staging + (max_reqs + 1) * per_req,
                      gpu_tier_pages=int(gpu_pages), gpu_tier_bytes=int(tier), gpu_tier_tokens=int(gpu_pages) * P,
                      prefix_pages=prefix_pages, prefix_bytes=staging)


def kv_bytes_per_token(shape: ModelShape) -> int:
    """Dense KV bytes of one token, all layers (K and V)."""
    return host_bytes_per_page(shape, 1)


def concurrent_requests(shape: ModelShape, layout: WorkingSetLayout, *, gpu_kv_bytes: int, host_bytes: int,
                        request_tokens: int, max_context_len: int, gpu_tier_bytes: int = 0,
                        kv_fp8: bool = False, freekv_gpu_kv_bytes: int | None = None) -> dict:
    """How many ``request_tokens``-token requests fit at once, dense vs FreeKV, from the sizing formulas.

    Args:
        gpu_kv_bytes: GPU memory SGLang gives its KV pool (dense: the whole pool; FreeKV: digests,
            working sets and scratch, as :func:`plan_memory` splits it).
        host_bytes: FreeKV's pinned host tier.
        request_tokens: prompt plus generated tokens of each request.
        max_context_len: the model's context length (sizes FreeKV's per-request scratch).
        gpu_tier_bytes: FreeKV's GPU tier (``--freekv-gpu-tier-gb``), out of FreeKV's GPU budget.
        freekv_gpu_kv_bytes: FreeKV's GPU budget when it differs from dense's pool (default
            ``gpu_kv_bytes``): a FreeKV server prefills without chunking, so SGLang reserves activation
            memory for its whole prefill budget and leaves less for KV (about 11% less for the
            Llama-3.1-8B shape).
    Returns ``{"dense": n, "freekv": n, "freekv_bound": "host" | "gpu"}``; a projection, not a measurement.
    """
    P = layout.page_size
    dense = gpu_kv_bytes // (request_tokens * kv_bytes_per_token(shape))
    fk_bytes = gpu_kv_bytes if freekv_gpu_kv_bytes is None else freekv_gpu_kv_bytes
    try:  # an unbounded user cap: the rows the GPU holds, not the host-tier cap plan_memory applies by default
        plan = plan_memory(shape, layout, host_bytes, fk_bytes, max_context_len, user_max_running_requests=2**62,
                           gpu_tier_bytes=gpu_tier_bytes, kv_fp8=kv_fp8)
    except FreeKVMemoryError:
        return {"dense": int(dense), "freekv": 0, "freekv_bound": "gpu"}
    by_host = plan.total_tokens // (-(-request_tokens // P) * P)
    by_gpu = plan.max_running_requests
    return {"dense": int(dense), "freekv": int(min(by_host, by_gpu)),
            "freekv_bound": "host" if by_host <= by_gpu else "gpu"}
