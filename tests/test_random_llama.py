"""The KV-sensitive random checkpoint the GPU server tests serve (freekv_sglang.testing.random_llama),
run with transformers on the CPU: its greedy tokens depend on distant context, rounding moves them
only where :func:`compare_greedy` allows, and SGLang's dummy weights (the contrast) ignore the context."""

import json
import random

import pytest
import torch

from freekv_sglang.testing.greedy_compare import (
    GreedyTrace,
    compare_greedy,
    compare_runs,
)
from freekv_sglang.testing.random_llama import (
    RandomLlamaSpec,
    random_llama_state_dict,
    write_random_llama,
)

transformers = pytest.importorskip("transformers")

N_NEW = 12


def greedy(model, ids) -> GreedyTrace:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    toks = out.sequences[0, len(ids):].tolist()
    lps = [s[0].float().log_softmax(-1) for s in out.scores]
    top = [list(zip(lp.topk(2).indices.tolist(), lp.topk(2).values.tolist())) for lp in lps]
    return GreedyTrace(toks, [lp[t].item() for lp, t in zip(lps, toks)], top)


def prompts(n=3, length=400, seed=1):
    """Pairs (prompt, the same prompt with tokens 50-150 replaced)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        a = [r.randrange(100, 49000) for _ in range(length)]
        b = list(a)
        b[50:150] = [r.randrange(100, 49000) for _ in range(100)]
        out.append((a, b))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("random-llama"))


def load(folder, dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def test_written_folder_is_a_llama_checkpoint(folder):
    cfg = json.loads((folder / "config.json").read_text())
    spec = RandomLlamaSpec()
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == spec.kv_heads
    assert cfg["num_attention_heads"] // cfg["num_key_value_heads"] == 4 and cfg["head_dim"] == 128
    assert (folder / "model.safetensors").stat().st_size > 2 * spec.hidden * spec.vocab * 2  # bf16 embed + head
    assert write_random_llama(folder) == folder  # same spec: reused, not rewritten


def test_state_dict_is_deterministic_and_scaled():
    spec = RandomLlamaSpec(hidden=256, layers=1, q_heads=2, kv_heads=1, intermediate=512, vocab=1000)
    a, b = random_llama_state_dict(spec), random_llama_state_dict(spec)
    assert all(torch.equal(a[k], b[k]) for k in a)
    q = a["model.layers.0.self_attn.q_proj.weight"]
    assert q.std().item() == pytest.approx((spec.qk_logit_std / spec.hidden) ** 0.5, rel=0.05)
    assert torch.equal(a["model.norm.weight"], torch.ones(spec.hidden))


def test_tokens_depend_on_distant_context_and_survive_rounding(folder):
    torch.manual_seed(0)
    m32, m16 = load(folder, torch.float32), load(folder, torch.bfloat16)
    changed, rounding = [], []
    for a, b in prompts():
        ta32 = greedy(m32, a)
        changed.append(compare_greedy(ta32, greedy(m32, b)))
        rounding.append(compare_greedy(ta32, greedy(m16, a)))
    print("distant context changed:", *changed, sep="\n  ")
    print("bf16 vs float32:", *rounding, sep="\n  ")
    assert all(not r.ok for r in changed)  # the comparison sees a different context
    assert all(r.ok for r in rounding)  # and accepts bf16 rounding


def test_batch_comparison_sees_one_wrong_page(folder):
    """Over a batch of prompts, one page (32 tokens) replaced deep in each 1000-token context is caught
    (pooled mean), while bf16 rounding of the same runs is not."""
    m32, m16 = load(folder, torch.float32), load(folder, torch.bfloat16)
    r = random.Random(9)
    ref, page, bf16 = [], [], []
    for _ in range(5):
        a = [r.randrange(100, 49000) for _ in range(1000)]
        b = list(a)
        s = r.randrange(64, 1000 - 128)
        b[s:s + 32] = [r.randrange(100, 49000) for _ in range(32)]
        ref.append(greedy(m32, a))
        page.append(greedy(m32, b))
        bf16.append(greedy(m16, a))
    one_page, rounding = compare_runs(page, ref), compare_runs(bf16, ref)
    print(f"one page replaced: {one_page}\nbf16 vs float32: {rounding}")
    assert not one_page.ok and rounding.ok


def test_sglang_dummy_weights_ignore_the_context(tmp_path):
    """The contrast: SGLang's dummy loader (every parameter U(-1e-3, 1e-3), one seed per parameter)."""
    spec = RandomLlamaSpec(layers=2)
    folder = write_random_llama(tmp_path / "m", spec)
    m = load(folder, torch.bfloat16)
    for p in m.state_dict().values():
        g = torch.Generator().manual_seed(1234)
        p.uniform_(-1e-3, 1e-3, generator=g)
    for a, b in prompts(n=2):
        assert greedy(m, a).tokens == greedy(m, b).tokens
