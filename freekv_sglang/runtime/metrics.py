"""FreeKV's figures in SGLang's Prometheus endpoint (``--enable-metrics``, ``/metrics``) and in
``/server_info`` (``internal_states[i]["freekv"]``).

Everything is read from the host side of the runtime: the decode counters through
:class:`~.stats.DecodeStats` snapshots (no host sync), tier and row occupancy from SGLang's own
allocators. The Prometheus objects are created in the scheduler process (after SGLang sets
``PROMETHEUS_MULTIPROC_DIR``), with SGLang's labels, and updated whenever SGLang logs its own
scheduler statistics (every ``--decode-log-interval`` decode steps and after prefills).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .stats import Totals

PREFIX = "sglang:freekv_"

#: Gauges: name -> (documentation, extra label names).
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "host_tier_pages_used": ("Pages of the pinned host tier that hold KV (running and cached requests).", ()),
    "host_tier_pages_total": ("Pages of the pinned host tier.", ()),
    "gpu_tier_pages_used": ("Pages of the GPU tier (--freekv-gpu-tier-gb) that hold KV.", ()),
    "gpu_tier_pages_total": ("Pages of the GPU tier (--freekv-gpu-tier-gb).", ()),
    "working_set_rows_used": ("GPU working-set rows held by requests (one per running request).", ()),
    "working_set_rows_total": ("GPU working-set rows.", ()),
    "recalled_pieces_per_request_step": (
        "Mean (page, KV head) pieces recalled host-to-GPU per request per decode step since the last update, by "
        "path: speculative (overlapped with compute) or critical (corrections, before attention).", ("path",)),
    "recalled_bytes_per_request_step": (
        "Mean K+V bytes recalled host-to-GPU per request per decode step since the last update, by path.",
        ("path",)),
    "corrected_head_ratio": (
        "Share of (layer, KV head) checks since the last update whose speculative pages were corrected.", ()),
}
#: Counters (totals since start-up): name -> (documentation, extra label names).
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "decode_steps": ("FreeKV decode steps.", ()),
    "decode_request_steps": (
        "Request-steps decoded, by mode: sparse (context longer than the working set) or dense (every page "
        "resident, exact attention).", ("mode",)),
    "correction_checks": ("(layer, KV head) correction checks.", ()),
    "corrected_heads": ("(layer, KV head) checks that reselected before attention.", ()),
    "recalled_pieces": ("(page, KV head) pieces recalled host-to-GPU, by path (speculative or critical).", ("path",)),
    "recalled_bytes": ("K+V bytes recalled host-to-GPU, by path (speculative or critical).", ("path",)),
}
PATHS = ("speculative", "critical")


def metric_names() -> list[str]:
    """Every FreeKV metric name as ``/metrics`` shows it (counters with their ``_total`` suffix)."""
    return [PREFIX + n for n in GAUGES] + [PREFIX + n + "_total" for n in COUNTERS]


def tier_usage(runtime, used_tokens: int) -> dict[str, int]:
    """Tier pages in use when SGLang's allocator has handed out ``used_tokens`` slots (running and cached
    requests). The allocator gives the host tier's lower page numbers first, so the GPU tier holds the rest."""
    page = runtime.layout.page_size
    host_total = runtime.host.n_pages - 1  # page 0 is SGLang's padding page
    used = -(-max(used_tokens, 0) // page)
    host_used = min(used, host_total)
    return {"host_tier_pages_used": host_used, "host_tier_pages_total": host_total,
            "gpu_tier_pages_used": min(used - host_used, runtime.n_gpu_pages),
            "gpu_tier_pages_total": runtime.n_gpu_pages}


def held_pages(runtime, used_tokens: int, cached_tokens: int) -> dict[str, int]:
    """Tier pages (both tiers) that only the radix cache holds (``cached_tokens``: its evictable tokens, freed on
    demand or by ``/flush_cache``) and those held otherwise, by requests (``used_tokens`` less the cached ones).
    On an idle server the held count is 0 unless pages leaked: unlike the used count it needs no ``/flush_cache``,
    which resets SGLang's allocator whole and would hide a leak."""
    page = runtime.layout.page_size
    used = -(-max(used_tokens, 0) // page)
    cached = -(-max(cached_tokens, 0) // page)
    return {"tier_pages_cached": cached, "tier_pages_held": used - cached}


def row_usage(runtime) -> dict[str, int]:
    """Working-set rows in use and in all (rows are SGLang's request rows; row 0 is padding)."""
    pool = runtime.row_pool
    used = pool.size - pool.available_size() if pool is not None else 0
    return {"working_set_rows_used": used, "working_set_rows_total": runtime.max_rows}


def counter_values(totals) -> dict[tuple[str, tuple[str, ...]], int]:
    """Counter name and label values -> total, from a :class:`~.stats.Totals` snapshot."""
    return {
        ("decode_steps", ()): totals.decode_steps,
        ("decode_request_steps", ("sparse",)): totals.sparse_request_steps,
        ("decode_request_steps", ("dense",)): totals.dense_request_steps,
        ("correction_checks", ()): totals.checks,
        ("corrected_heads", ()): totals.corrected_heads,
        ("recalled_pieces", ("speculative",)): totals.recalled_speculative,
        ("recalled_pieces", ("critical",)): totals.recalled_critical,
    }


def interval_gauges(delta, piece_bytes: int) -> dict[tuple[str, tuple[str, ...]], float]:
    """Gauge values over one update interval (``delta``: a :class:`~.stats.Totals` difference)."""
    per_req = max(delta.request_steps, 1)
    out = {("corrected_head_ratio", ()): delta.corrected_heads / max(delta.checks, 1)}
    for path, n in zip(PATHS, (delta.recalled_speculative, delta.recalled_critical)):
        out[("recalled_pieces_per_request_step", (path,))] = n / per_req
        out[("recalled_bytes_per_request_step", (path,))] = n * piece_bytes / per_req
    return out


class PrometheusExporter:
    """FreeKV's gauges and counters with SGLang's labels (``labels``: name -> value, e.g. model name)."""

    def __init__(self, labels: dict[str, str]):
        from prometheus_client import Counter, Gauge  # after SGLang set PROMETHEUS_MULTIPROC_DIR

        self.labels = dict(labels)
        base = tuple(self.labels)
        self.gauges = {n: Gauge(PREFIX + n, doc, labelnames=base + extra, multiprocess_mode="mostrecent")
                       for n, (doc, extra) in GAUGES.items()}
        self.counters = {n: Counter(PREFIX + n, doc, labelnames=base + extra) for n, (doc, extra) in COUNTERS.items()}
        self.last = None  # Totals at the previous update

    def _labels(self, extra: tuple[str, ...]) -> dict:
        return tuple(self.labels.values()) + extra

    def update(self, runtime, used_tokens: int) -> None:
        """Set the gauges and advance the counters to the runtime's newest snapshot."""
        for name, value in {**tier_usage(runtime, used_tokens), **row_usage(runtime)}.items():
            self.gauges[name].labels(*self._labels(())).set(value)
        now = runtime.stats_counter.totals()
        last = self.last or Totals()
        delta = now.minus(last)
        if delta.decode_steps:
            for (name, extra), value in interval_gauges(delta, runtime.piece_bytes).items():
                self.gauges[name].labels(*self._labels(extra)).set(value)
        prev = counter_values(last)
        for key, value in counter_values(now).items():
            if value > prev[key]:
                name, extra = key
                self.counters[name].labels(*self._labels(extra)).inc(value - prev[key])
        for path, n, p in zip(PATHS, (now.recalled_speculative, now.recalled_critical),
                              (last.recalled_speculative, last.recalled_critical)):
            if n > p:
                self.counters["recalled_bytes"].labels(*self._labels((path,))).inc((n - p) * runtime.piece_bytes)
        self.last = now


def server_info(runtime, cfg: Any, used_tokens: int, cached_tokens: int | None = None) -> dict:
    """FreeKV's entry in ``/server_info``: the effective settings, tier and row use (with ``cached_tokens``, the
    radix cache's evictable tokens, also the pages it alone holds and the pages requests hold), and the decode
    totals."""
    totals = runtime.stats_counter.totals()
    return {
        "settings": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg),
        "decode_attention": runtime.attention.kernel,
        **tier_usage(runtime, used_tokens),
        **(held_pages(runtime, used_tokens, cached_tokens) if cached_tokens is not None else {}),
        **row_usage(runtime),
        "totals": {f.name: getattr(totals, f.name) for f in dataclasses.fields(totals)}
        | {"dense_request_steps": totals.dense_request_steps,
           "recalled_bytes": (totals.recalled_critical + totals.recalled_speculative) * runtime.piece_bytes},
        "rates": totals.rates(runtime.piece_bytes),
        # K+V bytes staged for prefill over cached prefixes, by copy path (block copies of page runs, gathered)
        "prefix_staged_bytes": dict(runtime.prefix.copied) if runtime.prefix is not None else {},
    }
