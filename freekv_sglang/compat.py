"""The single place that names SGLang internals.

Every dotted hook target, private attribute and version-dependent access the
plugin relies on is spelled here, so a new SGLang release means reviewing one
file. Importing this module does not import SGLang; the helpers import it
lazily.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

#: SGLang releases this package is written against (inclusive range).
SUPPORTED_SGLANG_MIN = (0, 5, 16)
SUPPORTED_SGLANG_MAX = (0, 5, 18)

# --------------------------------------------------------------- hook targets
#: staticmethod ``(parser) -> None``; hooked AFTER to add the FreeKV flags.
SERVER_ARGS_ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
#: classmethod ``(cls, namespace) -> ServerArgs``; hooked AROUND (``hook(orig, cls, ns)``).
SERVER_ARGS_FROM_CLI_ARGS = "sglang.srt.server_args.ServerArgs.from_cli_args"

# Runtime-side targets (used by freekv_sglang.runtime; listed here so every
# SGLang name lives in one file).
KV_CONFIGURATOR_BUILD_MHA_POOL = (
    "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mha_kv_pool"
)
KV_CONFIGURATOR_BUILD_REQ_POOL = (
    "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_default_req_pool"
)
KV_CONFIGURATOR_RESOLVE_POOL_CONFIG = (
    "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
    "._resolve_memory_pool_config"
)
KV_CONFIGURATOR_BUILD_TOKEN_TO_KV_POOL = (
    "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_token_to_kv_pool"
)
MODEL_RUNNER_FORWARD_RAW = "sglang.srt.model_executor.model_runner.ModelRunner._forward_raw"
#: ``(self, stats: SchedulerStats) -> None``; hooked AFTER to export FreeKV's metrics beside SGLang's.
METRICS_COLLECTOR_LOG_STATS = "sglang.srt.observability.metrics_collector.SchedulerMetricsCollector.log_stats"
#: ``(self, recv_req) -> GetInternalStateReqOutput``; hooked AFTER to add ``internal_state["freekv"]``.
SCHEDULER_GET_INTERNAL_STATE = "sglang.srt.managers.scheduler.Scheduler.get_internal_state"
RELEASE_KV_CACHE = "sglang.srt.mem_cache.common.release_kv_cache"

#: Name under which the FreeKV attention backend is registered with SGLang.
ATTENTION_BACKEND_NAME = "freekv"
#: Underscore attribute carrying the FreeKVConfig on ServerArgs (survives pickling).
SERVER_ARGS_ATTR = "_freekv"


# ------------------------------------------------------------------- versions
def sglang_version() -> Optional[str]:
    """The installed SGLang distribution version, or ``None`` if not installed."""
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def _release_tuple(version: str) -> tuple[int, ...]:
    m = re.match(r"^\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


def is_supported_sglang(version: Optional[str]) -> bool:
    """True if ``version`` lies in the tested 0.5.16-0.5.18 range."""
    if not version:
        return False
    rel = _release_tuple(version)[:3]
    return SUPPORTED_SGLANG_MIN <= rel <= SUPPORTED_SGLANG_MAX


def check_sglang_version() -> bool:
    """Warn (once per call) if the installed SGLang is outside the tested range."""
    version = sglang_version()
    ok = is_supported_sglang(version)
    if not ok:
        lo = ".".join(map(str, SUPPORTED_SGLANG_MIN))
        hi = ".".join(map(str, SUPPORTED_SGLANG_MAX))
        logger.warning(
            "freekv-sglang is tested with SGLang %s-%s; found %s. Hooks may not apply.",
            lo, hi, version or "no sglang",
        )
    return ok


# --------------------------------------------------------------- SGLang access
def get_req_pool_idx(req: Any) -> Optional[int]:
    """A request's row in the req-to-token pool, across SGLang versions.

    0.5.12-0.5.18 keep it on ``req.req_pool_idx``; 0.5.19+ on ``req.kv.req_pool_idx``.
    """
    idx = getattr(req, "req_pool_idx", None)
    if idx is None:
        kv = getattr(req, "kv", None)
        idx = getattr(kv, "req_pool_idx", None) if kv is not None else None
    return idx


def server_args_class() -> type:
    from sglang.srt.server_args import ServerArgs

    return ServerArgs


def add_attention_backend_choice(name: str = ATTENTION_BACKEND_NAME) -> None:
    """Let ``--attention-backend NAME`` parse (idempotent)."""
    from sglang.srt import server_args as sa_mod

    if name not in sa_mod.ATTENTION_BACKEND_CHOICES:
        sa_mod.add_attention_backend_choices([name])


def register_hook(target: str, hook: Callable, kind: str) -> bool:
    """Register ``hook`` on ``target`` with SGLang's HookRegistry, once.

    ``kind`` is a ``HookType`` member name (``"AFTER"``, ``"AROUND"``...).
    Returns False if the same hook is already registered for that target.
    """
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    hook_type = HookType[kind]
    for existing_type, existing, _src in HookRegistry._hooks.get(target, ()):
        if existing is hook and existing_type is hook_type:
            return False
    HookRegistry.register(target, hook, hook_type)
    return True


def mark_server_args(sa: Any, value: Any) -> None:
    """Attach ``value`` as :data:`SERVER_ARGS_ATTR`.

    Resolved ServerArgs refuse new public attributes; underscore names bypass
    that check and are kept when the object is pickled into scheduler processes.
    """
    object.__setattr__(sa, SERVER_ARGS_ATTR, value)


def cuda_graphs_disabled(sa: Any, phases: tuple[str, ...] = ("decode", "prefill")) -> Optional[bool]:
    """Whether resolved ServerArgs capture no CUDA graph; ``None`` if unknown.

    0.5.17 resolves the legacy ``disable_cuda_graph`` flag and the per-phase
    flags into ``sa.cuda_graph_config.{decode,prefill}.backend``.
    """
    cfg = getattr(sa, "cuda_graph_config", None)
    if cfg is None or not hasattr(cfg, "decode"):
        return None
    try:
        from sglang.srt.model_executor.cuda_graph_config import Backend
    except ImportError:
        Backend = None  # noqa: N806
    disabled = getattr(Backend, "DISABLED", "disabled") if Backend else "disabled"
    return all(
        getattr(getattr(cfg, phase, None), "backend", None) in (disabled, "disabled")
        for phase in phases
    )


def model_uses_mla(sa: Any) -> Optional[bool]:
    """MLA check on resolved ServerArgs (model config already loaded); ``None`` if unknown."""
    if getattr(sa, "model_config", None) is None:
        return None
    try:
        return bool(sa.use_mla_backend())
    except Exception:  # noqa: BLE001 - best effort, the pre-check already ran
        return None
