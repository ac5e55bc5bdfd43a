"""Model folders of real shapes for serving tests with dummy weights (``--load-format dummy``).

The GPU server tests (``tests/gpu/test_server_e2e.py``, ``tests/gpu/test_server_traffic.py``) serve
the layer shapes of Llama-3.1-8B and Qwen2.5-7B with SGLang's dummy weights: what they check is
serving, memory and the API, not accuracy. A folder holds ``config.json`` (the shapes below), a
tokenizer built here and a chat template, and no weights. :func:`write_shape_model` writes one, so
the tests need nothing outside the repository.

The tokenizer (:func:`write_tokenizer`) is a byte-level BPE tokenizer without merges: the three
ChatML special tokens at ids 0-2 (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, as the
configs' pad, bos and eos ids), the 256 byte symbols, and filler tokens ``" t<i>"`` up to the
vocabulary of 49152 (SmolLM2's size, which the configs use instead of the models' own
vocabularies). Text encodes to one token per byte and every id decodes to text, which is all that
SGLang's text endpoints, its frontend language, the OpenAI-compatible API and its load generator
need from a model whose outputs carry no signal.
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB = 49152
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2: pad, bos, eos

#: Llama-3.1-8B layer shapes (32 layers, 32 query / 8 KV heads of 128, llama3 RoPE scaling to 128K).
LLAMA_8B_SHAPE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "initializer_range": 0.02,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": VOCAB,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "bfloat16",
    "_note": "Llama-3.1-8B layer shapes; vocab 49152 (the real 8B has 128256). No weights: --load-format dummy.",
}

#: Qwen2.5-7B layer shapes (28 layers, 28 query / 4 KV heads of 128, QKV bias as in Qwen2).
QWEN_7B_SHAPE = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-06,
    "initializer_range": 0.02,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": VOCAB,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "bfloat16",
    "_note": "Qwen2.5-7B layer shapes; vocab 49152 (the real 7B has 152064). No weights: --load-format dummy.",
}

SHAPES = {"llama-8b-shape": LLAMA_8B_SHAPE, "qwen2.5-7b-shape": QWEN_7B_SHAPE}

#: ChatML, as SmolLM2's template.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_tokenizer(folder: str | Path, vocab: int = VOCAB) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` (module docstring)
    into ``folder``; returns it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols; "\u0120" is the space
    table = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for s in symbols:
        table[s] = len(table)
    i = 0
    while len(table) < vocab:
        table[f"\u0120t{i}"] = len(table)
        i += 1
    tok = Tokenizer(models.BPE(vocab=table, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[1], "eos_token": SPECIAL_TOKENS[2],
           "unk_token": SPECIAL_TOKENS[0], "pad_token": SPECIAL_TOKENS[0], "add_prefix_space": False,
           "clean_up_tokenization_spaces": False, "model_max_length": 131072, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


def write_shape_model(folder: str | Path, shape: str = "llama-8b-shape") -> Path:
    """Write a dummy-weight model folder of ``shape`` (a key of :data:`SHAPES`): ``config.json``,
    ``generation_config.json`` and the tokenizer; returns the folder."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    out = write_tokenizer(folder)
    (out / "config.json").write_text(json.dumps(SHAPES[shape], indent=1))
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1))
    return out


def model_folder(shape: str, env_var: str, root: str | Path) -> str:
    """The folder a test serves for ``shape``: ``$env_var`` when set (it must exist: a named folder that is
    missing is an error, not a reason to skip), else a folder written under ``root`` by
    :func:`write_shape_model`."""
    import os

    named = os.environ.get(env_var)
    if named:
        if not os.path.isdir(named):
            raise FileNotFoundError(f"{env_var}={named} is not a folder")
        return named
    return str(write_shape_model(Path(root) / shape, shape))
