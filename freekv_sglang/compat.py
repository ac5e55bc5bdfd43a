"""The single place that names SGLang internals.

Every SGLang module, class, function, hook target and private attribute the package touches is a dotted name
here (:data:`HOOK_TARGETS`, :data:`INTERNALS`), reached through an accessor that imports it when called, so a new
SGLang release means reviewing one file (tests/test_compat.py checks that every name resolves, that the hooks
registered are exactly :data:`HOOK_TARGETS` and that no other module imports SGLang). Importing it imports no SGLang.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import re
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

#: SGLang releases this package is written against (inclusive range).
SUPPORTED_SGLANG_MIN = (0, 5, 16)
SUPPORTED_SGLANG_MAX = (0, 5, 18)

# --------------------------------------------------------------- hook targets
SERVER_ARGS_MODULE = "sglang.srt.server_args"
KV_CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
#: staticmethod ``(parser) -> None``; hooked AFTER to add the FreeKV flags (plugin).
SERVER_ARGS_ADD_CLI_ARGS = f"{SERVER_ARGS_MODULE}.ServerArgs.add_cli_args"
#: classmethod ``(cls, namespace) -> ServerArgs``; hooked AROUND (``hook(orig, cls, ns)``) (plugin).
SERVER_ARGS_FROM_CLI_ARGS = f"{SERVER_ARGS_MODULE}.ServerArgs.from_cli_args"
#: ``(self, pre_model_load_memory) -> MemoryPoolConfig``; hooked AROUND to size the tiers (runtime).
KV_CONFIGURATOR_RESOLVE_POOL_CONFIG = f"{KV_CONFIGURATOR}._resolve_memory_pool_config"
#: ``(self, *, sizes, is_dsa_model, is_dsv4_model, req_to_token_pool)``; hooked AROUND to build the FreeKV pool.
KV_CONFIGURATOR_BUILD_TOKEN_TO_KV_POOL = f"{KV_CONFIGURATOR}._build_token_to_kv_pool"
#: ``(self, stats: SchedulerStats) -> None``; hooked AFTER to export FreeKV's metrics beside SGLang's.
METRICS_COLLECTOR_LOG_STATS = "sglang.srt.observability.metrics_collector.SchedulerMetricsCollector.log_stats"
#: ``(self, recv_req) -> GetInternalStateReqOutput``; hooked AFTER to add ``internal_state["freekv"]``.
SCHEDULER_GET_INTERNAL_STATE = "sglang.srt.managers.scheduler.Scheduler.get_internal_state"
#: private ``(self, obj, input_ids) -> None``, the HTTP server's per-prompt checks (a ``ValueError`` is a 400);
#: hooked AROUND in every process by the plugin to refuse token ids outside the vocabulary and mistyped sampling
#: parameters on FreeKV servers (``freekv_sglang.request_checks``).
TOKENIZER_MANAGER_VALIDATE_ONE_REQUEST = (
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request")
#: private ``(self, req, is_retracted=False)``, every request's way into the waiting queue; hooked BEFORE by the
#: runtime to end a request whose ids lie outside the vocabulary with SGLang's own abort.
SCHEDULER_ADD_REQUEST_TO_QUEUE = "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue"
#: Every target the plugin (first three) and the runtime hook.
HOOK_TARGETS = (SERVER_ARGS_ADD_CLI_ARGS, SERVER_ARGS_FROM_CLI_ARGS, TOKENIZER_MANAGER_VALIDATE_ONE_REQUEST,
                KV_CONFIGURATOR_RESOLVE_POOL_CONFIG, KV_CONFIGURATOR_BUILD_TOKEN_TO_KV_POOL,
                METRICS_COLLECTOR_LOG_STATS, SCHEDULER_GET_INTERNAL_STATE, SCHEDULER_ADD_REQUEST_TO_QUEUE)

# ------------------------------------------------------------ other internals
SERVER_ARGS = f"{SERVER_ARGS_MODULE}.ServerArgs"
ATTENTION_BACKEND_CHOICES = f"{SERVER_ARGS_MODULE}.ATTENTION_BACKEND_CHOICES"
ADD_ATTENTION_BACKEND_CHOICES = f"{SERVER_ARGS_MODULE}.add_attention_backend_choices"
HOOK_REGISTRY = "sglang.srt.plugins.hook_registry.HookRegistry"
#: private: ``{target: [(HookType, hook, source), ...]}``, read to register a hook once
HOOK_REGISTRY_HOOKS = f"{HOOK_REGISTRY}._hooks"
HOOK_TYPE = "sglang.srt.plugins.hook_registry.HookType"
REGISTER_ATTENTION_BACKEND = "sglang.srt.layers.attention.attention_registry.register_attention_backend"
#: base class of the ``freekv`` attention backend (runtime.backend)
FLASHINFER_ATTN_BACKEND = "sglang.srt.layers.attention.flashinfer_backend.FlashInferAttnBackend"
#: base class of the FreeKV KV pool (runtime.pool), which overrides its private allocation log
NOOP_MHA_POOL = "sglang.srt.mem_cache.memory_pool.NoOpMHATokenToKVPool"
NOOP_MHA_POOL_ALLOCATION_LOG = f"{NOOP_MHA_POOL}._finalize_allocation_log"
UNWRAP_WRITE_LOC = "sglang.srt.mem_cache.memory_pool.unwrap_write_loc"
#: SGLang's host-pool allocator (``FREEKV_HOST_ALLOC=sglang`` and the fallback of the host tier)
HOST_TENSOR_ALLOCATOR = "sglang.srt.mem_cache.pool_host.common.HostTensorAllocator"
ALLOC_WITH_HOST_REGISTER = "sglang.srt.mem_cache.pool_host.common.alloc_with_host_register"
CUDA_HOST_UNREGISTER = "sglang.srt.mem_cache.pool_host.common._cuda_host_unregister"
MEMORY_POOL_CONFIG = "sglang.srt.model_executor.pool_configurator.MemoryPoolConfig"
#: private ``(self, pre_model_load_memory) -> int``: the GPU bytes SGLang would give its KV pool
KV_CONFIGURATOR_PROFILE_AVAILABLE_BYTES = f"{KV_CONFIGURATOR}._profile_available_bytes"
RUNTIME_CONTEXT = "sglang.srt.runtime_context"
RUNTIME_CONTEXT_GETTERS = tuple(f"{RUNTIME_CONTEXT}.get_{x}" for x in ("parallel", "schedule", "buffer", "exec"))
#: ``get_buffer`` key of the FlashInfer workspace, shared with SGLang's own FlashInfer backend
FLASHINFER_WORKSPACE_BUFFER = "flashinfer_workspace"
FLASHINFER_WORKSPACE_SIZE = "sglang.srt.environ.envs.SGLANG_FLASHINFER_WORKSPACE_SIZE"
GET_AVAILABLE_GPU_MEMORY = "sglang.srt.utils.common.get_available_gpu_memory"
CUDA_GRAPH_BACKEND = "sglang.srt.model_executor.cuda_graph_config.Backend"
#: base class of the teacher-forcing logit processor (freekv_sglang.testing)
CUSTOM_LOGIT_PROCESSOR = "sglang.srt.sampling.custom_logit_processor.CustomLogitProcessor"
#: the overlap scheduler's write-after-read barrier (``Scheduler._apply_war_barrier``): set, the schedule stream's
#: next writes wait for the whole previous forward instead of the read-done event a decode CUDA graph records
#: before its replay (FreeKV's decode graphs read ``req_to_token`` during the replay; docs/DESIGN.md)
FORCE_COARSE_WAR_BARRIER = "sglang.srt.environ.envs.SGLANG_FORCE_COARSE_WAR_BARRIER"
#: ``Req.set_finish_with_abort(msg)``: ends a request with status 400 and ``msg`` after a one-token prefill (how
#: the scheduler refuses a prompt longer than the context); used on requests with ids outside the vocabulary
REQ_SET_FINISH_WITH_ABORT = "sglang.srt.managers.schedule_batch.Req.set_finish_with_abort"
#: the scheduler's ``tree_cache.evictable_size()``: tokens only the radix cache holds (``/server_info``'s
#: ``tier_pages_cached``; every prefix cache has it, 0 without a radix cache)
PREFIX_CACHE_EVICTABLE_SIZE = "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.evictable_size"
#: the sampling-parameter class whose fields ``/generate``'s ``sampling_params`` may name (a msgspec Struct)
SAMPLING_PARAMS = "sglang.srt.sampling.sampling_params.SamplingParams"
#: Every other SGLang name the package touches.
INTERNALS = (*(v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str) and v.startswith("sglang.")
                and v not in HOOK_TARGETS), *RUNTIME_CONTEXT_GETTERS)

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


# ------------------------------------------------------------ name resolution
def resolve(name: str) -> Any:
    """The module, class, function or attribute a dotted SGLang name denotes, imported now.

    The longest importable prefix is the module, the rest attributes; an ``ImportError`` raised inside a
    module (SGLang or one of its dependencies missing) propagates unchanged.
    """
    parts, i = name.split("."), 1
    obj = importlib.import_module(parts[0])
    while i < len(parts):
        try:
            obj = importlib.import_module(".".join(parts[:i + 1]))
        except ModuleNotFoundError as e:
            if e.name != ".".join(parts[:i + 1]):
                raise
            break
        i += 1
    return functools.reduce(getattr, parts[i:], obj)


# --------------------------------------------------------------- SGLang access
# the plain accessors: each imports its name when called
server_args_class = functools.partial(resolve, SERVER_ARGS)
flashinfer_backend_class = functools.partial(resolve, FLASHINFER_ATTN_BACKEND)
noop_mha_pool_class = functools.partial(resolve, NOOP_MHA_POOL)
unwrap_write_loc_fn = functools.partial(resolve, UNWRAP_WRITE_LOC)
memory_pool_config_class = functools.partial(resolve, MEMORY_POOL_CONFIG)
runtime_context = functools.partial(resolve, RUNTIME_CONTEXT)  # get_parallel, get_schedule, get_buffer, get_exec
custom_logit_processor_class = functools.partial(resolve, CUSTOM_LOGIT_PROCESSOR)


def get_req_pool_idx(req: Any) -> Optional[int]:
    """A request's row in the req-to-token pool, across SGLang versions.

    0.5.12-0.5.18 keep it on ``req.req_pool_idx``; 0.5.19+ on ``req.kv.req_pool_idx``.
    """
    idx = getattr(req, "req_pool_idx", None)
    if idx is None:
        kv = getattr(req, "kv", None)
        idx = getattr(kv, "req_pool_idx", None) if kv is not None else None
    return idx


def add_attention_backend_choice(name: str = ATTENTION_BACKEND_NAME) -> None:
    """Let ``--attention-backend NAME`` parse (idempotent)."""
    if name not in resolve(ATTENTION_BACKEND_CHOICES):
        resolve(ADD_ATTENTION_BACKEND_CHOICES)([name])


def register_hook(target: str, hook: Callable, kind: str) -> bool:
    """Register ``hook`` on ``target`` with SGLang's HookRegistry, once.

    ``kind`` is a ``HookType`` member name (``"AFTER"``, ``"AROUND"``...).
    Returns False if the same hook is already registered for that target.
    """
    hook_type = resolve(HOOK_TYPE)[kind]
    for existing_type, existing, _src in resolve(HOOK_REGISTRY_HOOKS).get(target, ()):
        if existing is hook and existing_type is hook_type:
            return False
    resolve(HOOK_REGISTRY).register(target, hook, hook_type)
    return True


def register_attention_backend(factory: Callable, name: str = ATTENTION_BACKEND_NAME) -> None:
    """Register ``factory(model_runner) -> backend`` as SGLang attention backend ``name``."""
    resolve(REGISTER_ATTENTION_BACKEND)(name)(factory)


def host_register_fns() -> tuple[Callable, Callable]:
    """``(alloc(shape, dtype) -> tensor, unregister(tensor))`` of SGLang's page-locked host-pool allocator;
    ``ImportError`` without SGLang."""
    alloc, allocator = resolve(ALLOC_WITH_HOST_REGISTER), resolve(HOST_TENSOR_ALLOCATOR)
    return (lambda shape, dtype: alloc(shape, dtype, "cpu", True, allocator())), resolve(CUDA_HOST_UNREGISTER)


def profile_available_bytes(configurator: Any, pre_model_load_memory: int) -> int:
    """GPU bytes SGLang's ``KVCacheConfigurator`` would give its KV pool."""
    return getattr(configurator, KV_CONFIGURATOR_PROFILE_AVAILABLE_BYTES.rsplit(".", 1)[1])(pre_model_load_memory)


def flashinfer_workspace(make: Callable[[int], Any]) -> Any:
    """The process's FlashInfer workspace buffer, shared with SGLang; ``make(nbytes)`` allocates it once."""
    size = resolve(FLASHINFER_WORKSPACE_SIZE)
    return runtime_context().get_buffer(FLASHINFER_WORKSPACE_BUFFER, lambda: make(size.get()))


def available_gpu_memory(device: str, gpu_id: int) -> float:
    """Free memory of a GPU, in GB, as SGLang measures it."""
    return resolve(GET_AVAILABLE_GPU_MEMORY)(device, gpu_id)


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
        disabled = resolve(CUDA_GRAPH_BACKEND).DISABLED
    except (ImportError, AttributeError):
        disabled = "disabled"
    return all(
        getattr(getattr(cfg, phase, None), "backend", None) in (disabled, "disabled")
        for phase in phases
    )


def force_coarse_war_barrier() -> Optional[str]:
    """Make the overlap scheduler order its next writes of shared buffers (``req_to_token``) after the whole
    previous forward (:data:`FORCE_COARSE_WAR_BARRIER`, an environment variable SGLang reads at every barrier).
    Returns the variable's name, or ``None`` where this SGLang has no such switch."""
    try:
        field = resolve(FORCE_COARSE_WAR_BARRIER)
    except (ImportError, AttributeError):
        return None
    field.set(True)
    return field.name


def model_uses_mla(sa: Any) -> Optional[bool]:
    """MLA check on resolved ServerArgs (model config already loaded); ``None`` if unknown."""
    if getattr(sa, "model_config", None) is None:
        return None
    try:
        return bool(sa.use_mla_backend())
    except Exception:  # noqa: BLE001 - best effort, the pre-check already ran
        return None
