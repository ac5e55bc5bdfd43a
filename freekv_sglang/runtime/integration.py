"""Wires the FreeKV runtime into an SGLang scheduler process (hooks only).

Installed by :func:`freekv_sglang.plugin.register` in scheduler processes when FreeKV is
requested:

* ``KVCacheConfigurator._resolve_memory_pool_config`` (around): SGLang's token capacity
  becomes the host tier's capacity; running requests are bounded by GPU working sets;
* ``KVCacheConfigurator._build_token_to_kv_pool`` (around): the FreeKV pool and runtime;
* ``SchedulerMetricsCollector.log_stats`` / ``Scheduler.get_internal_state`` (after): FreeKV's metrics and its
  entry in ``/server_info``;
* ``Scheduler._add_request_to_queue`` (before): a request whose token ids lie outside the vocabulary ends with
  SGLang's abort instead of reaching the embedding (:mod:`freekv_sglang.request_checks`);
* attention backend ``freekv``.
"""

from __future__ import annotations

import logging

import torch

from freekv_sglang import compat
from freekv_sglang.request_checks import before_add_request_to_queue

logger = logging.getLogger(__name__)

_PLAN = None  # MemoryPlan of this process (one model replica per scheduler process)
_RUNTIME = None  # the FreeKVRuntime of this process, once built


def current_runtime():
    """The FreeKV runtime of this process, or ``None`` (statistics, benchmarks)."""
    return _RUNTIME


def _freekv_config(server_args):
    cfg = getattr(server_args, "_freekv", None)
    if cfg is None:
        from freekv_sglang.config import FreeKVConfig

        cfg = FreeKVConfig.from_env()
    return cfg if cfg is not None and cfg.enabled else None


def _model_shape(configurator):
    from .sizing import ModelShape

    mc = configurator.model_config
    tp = compat.runtime_context().get_parallel().attn_tp_size
    return ModelShape(
        n_layers=configurator.layer_info.num_effective_layers,
        n_q_heads=mc.num_attention_heads // tp,
        n_kv_heads=mc.get_num_kv_heads(tp),
        head_dim=mc.head_dim,
        dtype=configurator.kv_cache_dtype,
    )


def _settings(cfg):
    from .engine import RuntimeSettings
    from .sizing import config_layout

    layout = config_layout(cfg)
    recall = cfg.effective_recall
    return RuntimeSettings(layout=layout, gqa_aggregation=cfg.gqa_aggregation,
                           correction_threshold=cfg.correction_threshold, speculative=cfg.speculative,
                           recall=recall, kv_fp8=cfg.kv_storage == "fp8_e4m3", keep_margin=cfg.keep_margin,
                           page_scoring=cfg.page_scoring)


def _prefix_tokens(server_args, context_len: int) -> int:
    """Tokens per prefix staging buffer: none unless the radix cache or chunked prefill is on."""
    from .prefix import staging_tokens

    chunk = getattr(server_args, "chunked_prefill_size", None)
    return staging_tokens(context_len, not getattr(server_args, "disable_radix_cache", True),
                          chunk is not None and chunk > 0)


def _resolve_memory_pool_config(orig, self, pre_model_load_memory):
    cfg = _freekv_config(self.server_args)
    if cfg is None or self.is_draft_worker:
        return orig(self, pre_model_load_memory)
    global _PLAN
    from freekv_sglang.config import resolve_host_memory_bytes

    from .sizing import capacity_warning, digest_warning, gpu_tier_note, plan_for_config

    context = compat.runtime_context()
    sched = context.get_schedule()
    gpu_bytes = compat.profile_available_bytes(self, pre_model_load_memory)
    # the host budget is for the whole server: every attention-TP rank of this host keeps the
    # KV of its own heads, so each takes an equal share
    host_bytes = resolve_host_memory_bytes(cfg) // max(1, context.get_parallel().attn_tp_size)
    _PLAN = plan_for_config(cfg, _model_shape(self), host_bytes, gpu_bytes, self.model_config.context_len,
                            sched.max_total_tokens, sched.max_running_requests,
                            prefix_tokens=_prefix_tokens(self.server_args, self.model_config.context_len))
    logger.info(_PLAN.summary())
    note = gpu_tier_note(_PLAN, gpu_bytes, cfg.page_size)
    if note:
        logger.info(note)
    for hint in (digest_warning(_PLAN, gpu_bytes, cfg.page_size),
                 capacity_warning(_PLAN, gpu_bytes, _model_shape(self))):
        if hint:
            logger.warning(hint)
    return compat.memory_pool_config_class()(max_total_num_tokens=_PLAN.total_tokens,
                                             max_running_requests=_PLAN.max_running_requests,
                                             mem_fraction_static=sched.mem_fraction_static)


def _build_token_to_kv_pool(orig, self, *, sizes, is_dsa_model, is_dsv4_model, req_to_token_pool):
    cfg = _freekv_config(self.server_args)
    if cfg is None or self.is_draft_worker:
        return orig(self, sizes=sizes, is_dsa_model=is_dsa_model, is_dsv4_model=is_dsv4_model,
                    req_to_token_pool=req_to_token_pool)
    if self.use_mla_backend or is_dsa_model or is_dsv4_model or self.is_hybrid_swa:
        raise NotImplementedError("FreeKV supports dense multi-head / grouped-query attention models only")
    from freekv_sglang.settings import load_settings

    from .engine import FreeKVRuntime
    from .pool import FreeKVTokenToKVPool

    shape = _model_shape(self)
    pool = FreeKVTokenToKVPool(
        sizes.max_total_num_tokens,
        page_size=self.pool_page_size,
        dtype=self.kv_cache_dtype,
        head_num=shape.n_kv_heads,
        head_dim=shape.head_dim,
        layer_num=shape.n_layers,
        device=self.device,
        enable_memory_saver=compat.runtime_context().get_exec().features.enable_memory_saver,
        start_layer=self.layer_info.start_layer,
        end_layer=self.layer_info.end_layer,
    )
    workspace = compat.flashinfer_workspace(lambda nbytes: torch.empty(nbytes, dtype=torch.uint8, device=self.device))
    rows = req_to_token_pool.size
    # decode batches (CUDA-graph ones padded with the dummy row) can exceed the row count
    graph_cfg = getattr(self.server_args, "cuda_graph_config", None)
    graph_max_bs = getattr(getattr(graph_cfg, "decode", None), "max_bs", None) or 0
    max_batch = max(rows, graph_max_bs)
    # SGLang's token capacity covers both tiers; the host tier takes the lower page numbers (the
    # allocator hands those out first) and the GPU tier, if any, the rest
    n_pages = sizes.max_total_num_tokens // cfg.page_size + 1
    n_host = min(n_pages, _PLAN.host_pages) if _PLAN is not None else n_pages
    runtime = FreeKVRuntime(shape, _settings(cfg), n_host_pages=n_host,
                            max_rows=rows, req_to_token=req_to_token_pool.req_to_token, max_batch=max_batch,
                            device=torch.device(self.device, self.gpu_id) if self.device == "cuda" else self.device,
                            workspace=workspace, n_gpu_pages=n_pages - n_host, env=load_settings(),
                            prefix_pages=_PLAN.prefix_pages if _PLAN is not None else 0)
    pool.runtime = runtime
    runtime.row_pool = req_to_token_pool
    global _RUNTIME
    _RUNTIME = runtime
    logger.info("FreeKV runtime ready: %d request rows x %d layers, working sets + digests%s %.2f GiB GPU, "
                "host tier %.2f GiB pinned; %s; decode attention %s; avail GPU mem %.2f GB", rows, shape.n_layers,
                f" + GPU tier ({runtime.n_gpu_pages} pages)" if runtime.n_gpu_pages else "",
                runtime.gpu_bytes / 2**30, runtime.host.nbytes / 2**30, cfg.summary(), runtime.attention.kernel,
                compat.available_gpu_memory(self.device, self.gpu_id))
    return pool


def _create_backend(runner):
    from .backend import FreeKVAttnBackend

    return FreeKVAttnBackend(runner)


_EXPORTER = None  # PrometheusExporter of this process, created on the first metrics update


def _after_log_stats(_result, collector, stats, *args, **kwargs):
    """AFTER ``SchedulerMetricsCollector.log_stats``: FreeKV's metrics, with the collector's labels."""
    global _EXPORTER
    if _RUNTIME is None:
        return None
    try:
        if _EXPORTER is None:
            from .metrics import PrometheusExporter

            _EXPORTER = PrometheusExporter(collector.labels)
        _EXPORTER.update(_RUNTIME, stats.kv_used_tokens + stats.kv_evictable_tokens)
    except Exception:  # noqa: BLE001 - metrics must never take the scheduler down
        logger.exception("FreeKV metrics update failed")
    return None


def _after_get_internal_state(result, scheduler, *args, **kwargs):
    """AFTER ``Scheduler.get_internal_state``: add ``internal_state["freekv"]`` (``/server_info``)."""
    if _RUNTIME is None:
        return None
    from .metrics import server_info

    alloc = scheduler.token_to_kv_pool_allocator
    used = scheduler.max_total_num_tokens - alloc.available_size()
    cached = scheduler.tree_cache.evictable_size()  # compat.PREFIX_CACHE_EVICTABLE_SIZE
    result.internal_state["freekv"] = server_info(_RUNTIME, _freekv_config(scheduler.server_args), used,
                                                  cached if isinstance(cached, int) else None)
    return None


def fence_scheduler_writes() -> None:
    """Under SGLang's overlap scheduler, order the schedule stream's next writes of ``req_to_token`` after the
    whole previous forward. SGLang 0.5.17 orders them after a read-done event that a decode CUDA graph records
    *before* its replay, on the premise that a graph's reads of shared buffers end with its input copies; FreeKV's
    decode graph reads ``req_to_token`` in every layer (selection and recall on the compute and side streams), so
    it needs the barrier's whole-forward form (docs/DESIGN.md, "Under the overlap scheduler"). Without the
    overlap scheduler SGLang never reaches the barrier and this changes nothing."""
    name = compat.force_coarse_war_barrier()
    if name is None:
        logger.warning("FreeKV: this SGLang has no switch for the overlap scheduler's whole-forward write-after-read "
                       "barrier; keep the overlap scheduler off (the plugin's default)")
    else:
        logger.info("FreeKV: %s=1 (the overlap scheduler's writes of req_to_token wait for the whole previous "
                    "forward: FreeKV's decode graphs read it during their replay)", name)


def install_runtime_hooks(cfg) -> None:
    """Register the pool/sizing hooks, the metrics hooks and the ``freekv`` attention backend, and fence the
    overlap scheduler's writes of ``req_to_token`` behind whole forwards (scheduler processes)."""
    fence_scheduler_writes()
    compat.register_attention_backend(_create_backend)
    compat.register_hook(compat.KV_CONFIGURATOR_RESOLVE_POOL_CONFIG, _resolve_memory_pool_config, "AROUND")
    compat.register_hook(compat.KV_CONFIGURATOR_BUILD_TOKEN_TO_KV_POOL, _build_token_to_kv_pool, "AROUND")
    compat.register_hook(compat.METRICS_COLLECTOR_LOG_STATS, _after_log_stats, "AFTER")
    compat.register_hook(compat.SCHEDULER_GET_INTERNAL_STATE, _after_get_internal_state, "AFTER")
    compat.register_hook(compat.SCHEDULER_ADD_REQUEST_TO_QUEUE, before_add_request_to_queue, "BEFORE")
    logger.info("FreeKV runtime hooks installed")
