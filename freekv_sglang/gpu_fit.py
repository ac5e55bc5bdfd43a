"""Refuse, before the model loads, a GPU that cannot hold one FreeKV working set.

SGLang measures the GPU memory left for KV only after it has loaded the weights, and the runtime's memory plan
(:func:`freekv_sglang.runtime.sizing.plan_memory`) refuses a GPU too small for the digests plus one working set
there. This check runs in the launcher first, on an upper bound of that memory, so that it never refuses a setup
SGLang would serve:

    KV bytes <= (largest GPU's total memory) x (--mem-fraction-static, or 1 when unset) - weights bytes / TP

with the weights' bytes read from the model folder's files (``*.safetensors``, else ``*.bin``/``*.pt``) and the GPU's
memory from NVML (no CUDA context in the launcher). Without NVML, a GPU, or a local model folder it does nothing and
the runtime's own check stays.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Callable, Optional

from .config import FreeKVConfig, FreeKVConfigError, resolve_host_memory_bytes

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


def largest_gpu_bytes() -> Optional[int]:
    """Total memory of the largest GPU NVML sees, in bytes; ``None`` without NVML or a GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver / no GPU: NVMLError and its subclasses
        return None
    try:
        n = pynvml.nvmlDeviceGetCount()
        sizes = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total for i in range(n)]
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return max(sizes) if sizes else None


def weights_bytes(model_path: Optional[str]) -> Optional[int]:
    """Bytes of the weight files of a local model folder (the first pattern of :data:`WEIGHT_PATTERNS` that
    matches); ``None`` for anything else (a hub id, no weight files)."""
    if not model_path or not os.path.isdir(model_path):
        return None
    for pattern in WEIGHT_PATTERNS:
        files = glob.glob(os.path.join(model_path, pattern))
        if files:
            return sum(os.path.getsize(f) for f in files)
    return None


def check_gpu_fits_one_working_set(get: Callable[[str, Any], Any], cfg: FreeKVConfig, hf: Optional[dict],
                                   gpu_bytes: Optional[int] = None, weight_bytes: Optional[int] = None) -> None:
    """Raise :class:`FreeKVConfigError` when even the upper bound of the module docstring cannot hold the digests of
    the host tier's pages plus one working set. ``get(name, default)`` reads the ServerArgs values; ``hf`` is the
    model's ``config.json``; ``gpu_bytes`` / ``weight_bytes`` default to :func:`largest_gpu_bytes` and
    :func:`weights_bytes` (tests pass them)."""
    if hf is None or "num_hidden_layers" not in hf:
        return
    gpu = largest_gpu_bytes() if gpu_bytes is None else gpu_bytes
    weights = weights_bytes(get("model_path", None)) if weight_bytes is None else weight_bytes
    if gpu is None or weights is None:
        return
    from .runtime.sizing import FreeKVMemoryError, plan_for_config, shape_from_hf_config

    tp = max(1, int(get("tp_size", 1) or 1))
    frac = get("mem_fraction_static", None) or 1.0
    kv_bound = max(0, int(gpu * frac - weights / tp))
    context = get("context_length", None) or hf.get("max_position_embeddings") or 4096
    try:
        plan_for_config(cfg, shape_from_hf_config(hf), resolve_host_memory_bytes(cfg) // tp, kv_bound, int(context))
    except FreeKVMemoryError as e:
        raise FreeKVConfigError(
            f"this GPU is too small for FreeKV with these settings (refused before loading the model): at most "
            f"{kv_bound / 2**30:.2f} GiB of the largest GPU's {gpu / 2**30:.1f} GiB can hold KV next to "
            f"{weights / tp / 2**30:.2f} GiB of weights; {e}") from None
