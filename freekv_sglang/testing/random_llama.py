"""A small Llama checkpoint with random weights whose greedy tokens depend on the KV cache.

Why not ``--load-format dummy``: SGLang's dummy loader fills every parameter, RMSNorm weights
included, with the same U(-1e-3, 1e-3) values per shape. Queries and keys are then about 1e-5,
attention is uniform, and the attention output is about 1e-3 of the residual stream, below bf16
resolution: the next token is a function of the current token alone. Measured on the CPU with the
Llama-3.1-8B shape (two layers): two 300-token prompts sharing only their last token produce the
same greedy continuation, the last-position logits differ by 1e-7 against a top-two gap of 2e-6. A
test that compares tokens of two runs on such a model passes whatever the attention computes.

The checkpoint written here has unit-variance embeddings and RMSNorm weights 1, queries and keys
scaled so that attention logits have a standard deviation of about ``qk_logit_std``, a small MLP
and an LM head scaled so that logits spread over several nats. Measured with transformers on the
CPU (four layers, 1200-token prompts, 24 greedy tokens): changing tokens 200-400 of the prompt
changes the continuation within 2-14 tokens, and its log-probabilities before that by 0.25-0.73
nats; running in bf16 instead of float32 moves them by at most 0.10 nats, and where the two
continuations split the top two tokens were tied. Random networks are chaotic, so two correct
implementations that round differently can still split at such a tie: compare runs with
:func:`freekv_sglang.testing.greedy_compare.compare_runs`, not by token equality.
``tests/test_random_llama.py`` checks these properties on the CPU.

The files are a plain Hugging Face folder (``config.json``, ``model.safetensors`` in bf16) that
SGLang loads with its default load format; tokenizer files can be copied from another folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


@dataclasses.dataclass(frozen=True)
class RandomLlamaSpec:
    """Shape and weight scales. Defaults: head dim 128 and GQA group 4 as Llama-3.1-8B, four layers."""

    hidden: int = 2048
    layers: int = 4
    q_heads: int = 16
    kv_heads: int = 4
    head_dim: int = 128
    intermediate: int = 5632
    vocab: int = 49152
    max_positions: int = 32768
    rope_theta: float = 500000.0
    qk_logit_std: float = 1.0  # std of q.k / sqrt(head_dim) for random unit-RMS inputs
    mlp_gain: float = 0.1  # MLP output std relative to the residual stream
    logit_std: float = 8.0  # std of the output logits
    seed: int = 0

    def config(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.q_heads, "num_key_value_heads": self.kv_heads,
                "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": 1e-5,
                "max_position_embeddings": self.max_positions, "rope_theta": self.rope_theta,
                "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
                "vocab_size": self.vocab, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                "torch_dtype": "bfloat16", "use_cache": True}

    def tag(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def random_llama_state_dict(spec: RandomLlamaSpec) -> dict[str, torch.Tensor]:
    """Weights in Hugging Face Llama naming, float32 (deterministic in ``spec.seed``).

    Scales (inputs to every projection have unit RMS after RMSNorm with weight 1):
    ``q_proj``/``k_proj`` entries N(0, s^2 / hidden) with ``s^2 = qk_logit_std`` (then
    ``q.k / sqrt(d)`` has std ``qk_logit_std``); ``v_proj``, ``o_proj`` 1/sqrt(fan_in) (attention adds
    an O(1) term to the residual); MLP ``mlp_gain`` times that; ``lm_head`` ``logit_std / sqrt(hidden)``.
    """
    g = torch.Generator().manual_seed(spec.seed)
    h, d = spec.hidden, spec.head_dim

    def normal(shape, std):
        return torch.randn(shape, generator=g) * std

    s = math.sqrt(spec.qk_logit_std)
    sd = {"model.embed_tokens.weight": normal((spec.vocab, h), 1.0),
          "model.norm.weight": torch.ones(h),
          "lm_head.weight": normal((spec.vocab, h), spec.logit_std / math.sqrt(h))}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(h)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h)
        sd[p + "self_attn.q_proj.weight"] = normal((spec.q_heads * d, h), s / math.sqrt(h))
        sd[p + "self_attn.k_proj.weight"] = normal((spec.kv_heads * d, h), s / math.sqrt(h))
        sd[p + "self_attn.v_proj.weight"] = normal((spec.kv_heads * d, h), 1 / math.sqrt(h))
        sd[p + "self_attn.o_proj.weight"] = normal((h, spec.q_heads * d), 1 / math.sqrt(spec.q_heads * d))
        sd[p + "mlp.gate_proj.weight"] = normal((spec.intermediate, h), 1 / math.sqrt(h))
        sd[p + "mlp.up_proj.weight"] = normal((spec.intermediate, h), 1 / math.sqrt(h))
        sd[p + "mlp.down_proj.weight"] = normal((h, spec.intermediate), spec.mlp_gain / math.sqrt(spec.intermediate))
    return sd


def write_random_llama(out_dir: str | Path, spec: RandomLlamaSpec = RandomLlamaSpec(),
                       tokenizer_from: str | Path | None = None) -> Path:
    """Write (or reuse, if ``out_dir`` already holds this spec) the checkpoint; returns the folder.

    ``tokenizer_from``: a folder whose tokenizer files are copied (its vocabulary must not exceed
    ``spec.vocab``)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    stamp = out / "freekv_random_llama.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("tag") == spec.tag():
        return out
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in random_llama_state_dict(spec).items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(spec.config(), indent=1))
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_from) / name
            if src.exists():
                shutil.copy(src, out / name)
    stamp.write_text(json.dumps({"tag": spec.tag(), "spec": dataclasses.asdict(spec)}, indent=1))
    return out
