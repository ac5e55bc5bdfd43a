"""Turning a FreeKV request into SGLang ServerArgs: checks, overrides, hand-off.

Shared by the CLI path (the ``ServerArgs.from_cli_args`` hook in
:mod:`freekv_sglang.plugin`) and the offline path
(:func:`freekv_sglang.make_server_args`). Both feed a plain ``dict`` of
ServerArgs values (an argparse namespace's ``vars()`` or keyword arguments):

1. :func:`check_requested_args` refuses SGLang settings FreeKV does not support
   yet, judged on what the user asked for (before SGLang resolves anything);
2. :func:`apply_base_overrides` rewrites the base settings FreeKV needs;
3. SGLang builds and resolves the ServerArgs;
4. :func:`finalize_server_args` re-checks the resolved result, attaches the
   config as ``_freekv`` and exports it in ``SGLANG_FREEKV_CONFIG``.

The module imports SGLang only inside functions that need it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any, Callable, MutableMapping, Optional

from freekv_sglang import compat
from freekv_sglang.config import (
    ENV_VAR,
    GIB,
    FreeKVConfig,
    FreeKVConfigError,
    resolve_host_memory_bytes,
)
from freekv_sglang.settings import env_name, load_settings

logger = logging.getLogger("freekv_sglang")

LOG_PREFIX = "[FreeKV]"

#: KV cache dtypes FreeKV handles (16-bit); FP8/FP4 caches are refused.
SUPPORTED_KV_CACHE_DTYPES = ("auto", "bf16", "bfloat16", "fp16", "float16")

# ----------------------------------------------------------------------------
# CUDA GRAPHS: FreeKV decode steps are captured (SGLang's decode graph runner);
# prefill runs eagerly. Everything that turns prefill graphs off lives in this
# block (and the matching check in finalize_server_args).
CUDA_GRAPH_OVERRIDES = {"disable_prefill_cuda_graph": True}
#: Per-phase backend selectors that outrank the disable flags in SGLang 0.5.17.
CUDA_GRAPH_BACKEND_KEYS = ("cuda_graph_backend_prefill",)
# ----------------------------------------------------------------------------


def _unsupported(flag: str, value: Any, extra: str = "") -> FreeKVConfigError:
    msg = f"{flag}={value!r} is not supported with --kv-retrieval freekv yet"
    return FreeKVConfigError(msg + (f" ({extra})" if extra else ""))


# ------------------------------------------------------------------ model check
def read_hf_config(model_path: Optional[str]) -> Optional[dict]:
    """The model's HF ``config.json`` as a dict, read cheaply; ``None`` if unavailable.

    Reads a local folder directly, or a hub id from the local HF cache only
    (never the network). Any failure returns ``None``: the check is then left
    to the check on resolved ServerArgs.
    """
    if not model_path or not isinstance(model_path, str):
        return None
    try:
        path = os.path.join(model_path, "config.json")
        if not os.path.isfile(path):
            if os.path.exists(model_path):
                return None  # a local file (e.g. GGUF) or a folder without config.json
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_path, "config.json")
            if not isinstance(cached, str):
                return None
            path = cached
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except Exception:  # noqa: BLE001 - unreadable config: skip this check
        return None


def is_mla_config(hf_config: dict) -> bool:
    """True for multi-head latent attention models (DeepSeek-V2/V3 style)."""
    for c in _text_configs(hf_config):
        if c.get("kv_lora_rank") is not None or c.get("q_lora_rank") is not None:
            return True
        for arch in c.get("architectures") or ():
            if isinstance(arch, str) and "deepseekv" in arch.lower():
                return True
    return False


def _text_configs(hf_config: dict) -> list[dict]:
    """The config and the language model's sub-config of a multimodal one."""
    return [hf_config] + [hf_config[k] for k in ("text_config", "language_config", "llm_config")
                          if isinstance(hf_config.get(k), dict)]


#: Architectures whose SGLang model attends through ``sliding_window`` (their classes report a window to the
#: attention backend). Others that carry the field (Mistral v0.1, Qwen2, Phi-3, Starcoder2) are served by SGLang
#: with full attention, and so by FreeKV.
SLIDING_WINDOW_ARCHS = ("Gemma2", "Gemma3", "Gemma4", "GptOss", "Exaone4", "Olmo2", "AfMoe", "Mellum")


def sliding_window_reason(hf_config: dict, context_length: Optional[int] = None) -> Optional[str]:
    """What in ``hf_config`` makes SGLang attend through a sliding window (or chunked local attention), or
    ``None``. FreeKV attends over the whole context, as SGLang does for models it serves without a window. A
    window at least as long as the context (``context_length``, else ``max_position_embeddings``) is full
    attention."""
    archs = [a for c in _text_configs(hf_config) for a in c.get("architectures") or () if isinstance(a, str)]
    windowed_arch = any(a.startswith(SLIDING_WINDOW_ARCHS) for a in archs)
    for c in _text_configs(hf_config):
        if c.get("attention_chunk_size"):
            return f"attention_chunk_size={c['attention_chunk_size']} (chunked local attention)"
        window = c.get("sliding_window")
        window = window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
        layer_types = c.get("layer_types")
        if isinstance(layer_types, list):  # transformers' per-layer list (Gemma 2/3, GPT-OSS, Cohere2, Olmo3, ...)
            sliding = sum(1 for t in layer_types if isinstance(t, str) and "sliding" in t)
            if sliding:
                return (f"{sliding} of {len(layer_types)} layers are sliding-window layers"
                        + (f" (window {window} tokens)" if window else ""))
            continue
        limit = context_length or c.get("max_position_embeddings")
        if windowed_arch and window and (not isinstance(limit, int) or window < limit):
            return f"sliding_window={window} tokens, shorter than the {limit}-token context"
    return None


# ------------------------------------------------------------------- the checks
def _check_args(get: Callable[[str, Any], Any], cfg: FreeKVConfig, resolved: bool) -> None:
    """Refuse unsupported combinations; ``get(name, default)`` reads a ServerArgs value.

    With ``resolved=False`` the values are what the user asked for (before the
    base overrides); with ``resolved=True`` they are SGLang's resolved values.
    """
    spec = get("speculative_algorithm", None)
    if spec:
        raise _unsupported("--speculative-algorithm", spec)
    if get("enable_hierarchical_cache", False):
        raise _unsupported("--enable-hierarchical-cache", True)
    if get("enable_hisparse", False):
        raise _unsupported("--enable-hisparse", True)
    pp = get("pp_size", 1)
    if pp is not None and pp > 1:
        raise _unsupported("--pp-size", pp, "pipeline parallelism")
    if get("enable_dp_attention", False):
        raise _unsupported("--enable-dp-attention", True)
    if get("enable_mixed_chunk", False):
        raise _unsupported("--enable-mixed-chunk", True, "decode steps are FreeKV's own CUDA-graph batches")
    mode = get("disaggregation_mode", "null")
    if mode not in (None, "null"):
        raise _unsupported("--disaggregation-mode", mode, "PD disaggregation")
    dtype = get("kv_cache_dtype", "auto")
    if dtype is not None and dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise _unsupported(
            "--kv-cache-dtype", dtype, "FreeKV keeps a 16-bit KV cache; use auto or bf16"
        )
    for key in ("attention_backend", "decode_attention_backend", "prefill_attention_backend"):
        backend = get(key, None)
        if backend not in (None, compat.ATTENTION_BACKEND_NAME):
            raise _unsupported(
                "--" + key.replace("_", "-"), backend,
                "FreeKV provides its own attention backend; drop the flag",
            )
    page = get("page_size", None)
    if page is not None and page != cfg.page_size:
        raise FreeKVConfigError(
            f"--page-size={page!r} differs from --freekv-page-size={cfg.page_size}; "
            "a different SGLang page size is not supported with --kv-retrieval freekv "
            "yet (drop --page-size, FreeKV sets it)"
        )
    if resolved:
        return
    hf = read_hf_config(get("model_path", None))
    if hf is not None and is_mla_config(hf):
        raise _unsupported(
            "--model-path", get("model_path", None),
            "MLA (DeepSeek-V2/V3-style latent attention) models",
        )
    window = sliding_window_reason(hf, get("context_length", None)) if hf is not None else None
    if window:
        raise _unsupported("--model-path", get("model_path", None),
                           f"sliding-window attention: {window}; FreeKV attends over the whole context")
    from .gpu_fit import check_gpu_fits_one_working_set

    check_gpu_fits_one_working_set(get, cfg, hf)


def check_requested_args(values: MutableMapping[str, Any], cfg: FreeKVConfig) -> None:
    """Check the user's ServerArgs values (before overrides) against FreeKV."""
    _check_args(lambda k, d: values.get(k, d), cfg, resolved=False)


OVERLAP_ENV = env_name("overlap_schedule")


def overlap_schedule_allowed() -> bool:
    """``FREEKV_EXPERIMENTAL_OVERLAP_SCHEDULE=1``: leave SGLang's overlap scheduler as configured (its
    write-after-read barrier in whole-forward form, :func:`freekv_sglang.runtime.integration.fence_scheduler_writes`).
    Off by default until its GPU comparison with the overlap scheduler off has run (docs/DESIGN.md)."""
    return load_settings().overlap_schedule


def forced_settings(cfg: FreeKVConfig) -> dict[str, tuple[Any, str]]:
    """ServerArgs values FreeKV sets, with the reason logged for each. SGLang's radix cache and chunked
    prefill stay as the user (or SGLang's defaults) chose: FreeKV serves cached prefixes from its host tier."""
    forced = {
        "attention_backend": (compat.ATTENTION_BACKEND_NAME, "FreeKV attention backend"),
        "page_size": (cfg.page_size, "= --freekv-page-size (radix-cache keys and chunks are whole pages)"),
        "disable_overlap_schedule": (True, f"the overlap scheduler stays off with FreeKV until validated on a GPU "
                                           f"({OVERLAP_ENV}=1 keeps it)"),
    }
    if overlap_schedule_allowed():
        del forced["disable_overlap_schedule"]
    return forced


def apply_base_overrides(values: MutableMapping[str, Any], cfg: FreeKVConfig) -> list[str]:
    """Rewrite the ServerArgs values FreeKV depends on; returns one note per change.

    Must run before SGLang resolves the ServerArgs (0.5.17 resolves in
    ``__post_init__`` and then refuses public attribute writes).
    """
    wanted = forced_settings(cfg)
    wanted.update({k: (v, "FreeKV prefill runs eagerly (decode steps are captured)")
                   for k, v in CUDA_GRAPH_OVERRIDES.items()})
    notes = []
    if overlap_schedule_allowed():
        notes.append(f"{OVERLAP_ENV}=1: the overlap scheduler stays as configured (experimental with FreeKV; its "
                     "writes of req_to_token wait for whole forwards)")
    for key, (value, reason) in wanted.items():
        old = values.get(key)
        if old != value:
            was = repr(old) if key in values else "default"
            values[key] = value
            notes.append(f"set {key}={value!r} (was {was}): {reason}")
    for key in CUDA_GRAPH_BACKEND_KEYS:  # part of the CUDA GRAPHS block above
        old = values.get(key)
        if old not in (None, "disabled"):
            values[key] = None
            notes.append(f"cleared {key} (was {old!r}): FreeKV prefill runs eagerly (decode steps are captured)")
    return notes


def pin_host_memory(cfg: FreeKVConfig) -> FreeKVConfig:
    """``cfg`` with auto host memory replaced by the value resolved now.

    Resolving once, in the launcher, gives every scheduler process the same
    server-wide budget instead of each taking a share of what it sees free.
    """
    if cfg.host_memory_gb is not None:
        return cfg
    return dataclasses.replace(cfg, host_memory_gb=resolve_host_memory_bytes(cfg) / GIB)


def prepare_values(
    values: MutableMapping[str, Any], cfg: FreeKVConfig
) -> tuple[FreeKVConfig, list[str]]:
    """Check and rewrite ServerArgs values for an enabled config.

    Returns the config to hand to the runtime (host memory pinned) and the
    override notes.
    """
    check_requested_args(values, cfg)
    pinned = pin_host_memory(cfg)  # fails now if auto sizing finds no memory
    return pinned, apply_base_overrides(values, cfg)


def finalize_server_args(sa: Any, cfg: FreeKVConfig) -> Any:
    """Check resolved ServerArgs, attach ``cfg`` as ``_freekv`` and export the env var."""
    try:
        _check_args(lambda k, d: getattr(sa, k, d), cfg, resolved=True)
    except FreeKVConfigError as e:
        raise FreeKVConfigError(f"after SGLang resolved its arguments: {e}") from None
    if compat.model_uses_mla(sa):
        raise _unsupported("--model-path", getattr(sa, "model_path", None), "MLA model")
    for key, (value, _) in forced_settings(cfg).items():
        if getattr(sa, key, value) != value:
            raise FreeKVConfigError(
                f"SGLang resolved {key}={getattr(sa, key)!r}, but FreeKV needs {value!r}; "
                "another flag or model default conflicts with --kv-retrieval freekv"
            )
    if compat.cuda_graphs_disabled(sa, phases=("prefill",)) is False:  # CUDA GRAPHS block
        raise FreeKVConfigError(
            "SGLang resolved prefill CUDA graphs as enabled (check --cuda-graph-config); "
            "FreeKV prefill runs eagerly (only decode steps are captured)"
        )
    compat.mark_server_args(sa, cfg)
    os.environ[ENV_VAR] = cfg.to_json()
    return sa


def clear_exported_config() -> None:
    """Drop a config exported by an earlier FreeKV launch in this process."""
    os.environ.pop(ENV_VAR, None)


# ---------------------------------------------------------------------- output
def announce(cfg: FreeKVConfig, notes: list[str]) -> None:
    """Log the effective configuration, one line per override and every warning.

    SGLang configures logging late (or not at all for the offline Engine), so
    when the ``freekv_sglang`` logger has nowhere to go the lines are printed
    to stderr instead.
    """
    emit(logging.INFO, cfg.summary())
    for note in notes:
        emit(logging.INFO, "override: " + note)
    for warning in cfg.warnings():
        emit(logging.WARNING, "WARNING: " + warning)


def emit(level: int, text: str) -> None:
    """Log ``text`` with the FreeKV prefix, or print it to stderr if logging would drop it."""
    if logging.getLogger().hasHandlers() and logger.isEnabledFor(level):
        logger.log(level, "%s %s", LOG_PREFIX, text)
    else:
        print(f"{LOG_PREFIX} {text}", file=sys.stderr, flush=True)


def split_freekv_kwargs(kwargs: MutableMapping[str, Any]) -> dict[str, Any]:
    """Pop ``kv_retrieval`` and every ``freekv_*`` key off ``kwargs``."""
    keys = [k for k in kwargs if k == "kv_retrieval" or k.startswith("freekv_")]
    return {k: kwargs.pop(k) for k in keys}


def build_server_args(kwargs: dict[str, Any]) -> Any:
    """Offline path: ServerArgs from keyword arguments, with FreeKV applied if requested.

    Raises :class:`FreeKVConfigError` on an invalid or unsupported setting.
    """
    values = dict(kwargs)
    cfg = FreeKVConfig.from_mapping(split_freekv_kwargs(values))
    server_args_cls = compat.server_args_class()
    if not cfg.enabled:
        clear_exported_config()
        return server_args_cls(**values)
    pinned, notes = prepare_values(values, cfg)
    announce(cfg, notes)
    return finalize_server_args(server_args_cls(**values), pinned)
